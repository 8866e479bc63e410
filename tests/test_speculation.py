"""Speculation is lossless: greedy token identity with plain decoding (fp32), sampled token
identity under the race coupling, exact sampling distribution under either coupling
(probability-integral-transform test with a deliberately poor drafter), full acceptance for an
unquantized drafter, and a drafter that follows weight updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_checkpoint
from transformers import AutoModelForCausalLM

from efficientrollout import cpu
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig
from efficientrollout.speculation.verify import verify

PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3 4", "What is the capital of France?", "a",
           "Once upon a time in a land far away, there lived", "def main():", "Roses are red"]


def engine(tiny_dir, **spec) -> NativeEngine:
    return NativeEngine(EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=256,
                                     speculation=SpeculationConfig(**spec)))


@pytest.fixture(scope="module")
def spec_engines(tiny_dir, tiny_engine):
    return {
        "always": engine(tiny_dir, mode="always", k=8),
        # exploration on every 3rd step whatever the prediction, so the tiny model's waves
        # always contain speculative steps (its timings alone may keep the gate at K=0)
        "adaptive": engine(tiny_dir, mode="adaptive", k_max=8, explore_every=3, explore_margin=1e9),
        "toggle-ladder": engine(tiny_dir, mode="toggle-ladder", toggle_speedup=0.0),  # always toggles on
    }


def req(i, prompt, **sampling) -> RolloutRequest:
    return RolloutRequest(id=f"r{i}", prompt=prompt, sampling=SamplingParams(**sampling))


@pytest.mark.parametrize("mode", ["always", "adaptive", "toggle-ladder"])
def test_greedy_identical_to_plain(tiny_engine, spec_engines, mode):
    spec = spec_engines[mode]
    # batch mixes: all together (more samples than slots), alone, and in pairs
    requests = [req(i, PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=5 + 7 * i, ignore_eos=True) for i in range(12)]
    plain = tiny_engine.generate(requests)
    assert [r.output_token_ids for r in spec.generate(requests)] == [r.output_token_ids for r in plain]
    assert sum(s.k > 0 for s in spec.trace) > 0, "the test must exercise speculative steps"
    for i in (0, 5, 11):
        assert spec.generate([requests[i]])[0].output_token_ids == plain[i].output_token_ids
    for got, want in zip(spec.generate(requests[:2]), plain[:2]):
        assert np.allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_raced_samples_are_plain_samples_whatever_k(tiny_dir):
    """With the race coupling (`--coupling race`) speculation never changes a seeded sample: an
    int8 drafter that is often wrong, fixed K of 2 and 6 and the adaptive gate all emit exactly
    plain sampling's tokens and log-probs, with top-k and top-p rows in the batch. Rejection
    sampling draws other (equally distributed) samples that depend on K."""
    sampling = [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, top_k=20), dict(temperature=0.0)]
    requests = [req(i, PROMPTS[i % len(PROMPTS)], max_new_tokens=30, seed=100 + i, ignore_eos=True, **sampling[i % 4]) for i in range(12)]
    plain = engine(tiny_dir, mode="plain", coupling="race").generate(requests)
    for spec in (engine(tiny_dir, mode="always", k=2, coupling="race"), engine(tiny_dir, mode="always", k=6, coupling="race"),
                 engine(tiny_dir, mode="adaptive", explore_every=3, explore_margin=1e9, coupling="race")):
        results = spec.generate(requests)
        assert [r.output_token_ids for r in results] == [r.output_token_ids for r in plain]
        for got, want in zip(results, plain):
            assert np.allclose(got.logprobs, want.logprobs, atol=1e-4)
        drafted, accepted = sum(r.speculation.drafted for r in results), sum(r.speculation.accepted for r in results)
        assert 0 < accepted < drafted, "the test must see drafts accepted and rejected"
    rejection = engine(tiny_dir, mode="always", k=6, coupling="rejection").generate(requests)
    assert [r.output_token_ids for r in rejection] != [r.output_token_ids for r in plain]


@pytest.mark.skipif(not cpu.avx512() and not torch.cuda.is_available(), reason="int4 needs AVX512 or CUDA")
def test_int4_drafter_is_lossless(tiny_engine, tiny_dir):
    spec = engine(tiny_dir, mode="always", k=4, drafter="int4", int4_group_size=32)
    requests = [req(i, PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=20, ignore_eos=True) for i in range(8)]
    results = spec.generate(requests)
    assert [r.output_token_ids for r in results] == [r.output_token_ids for r in tiny_engine.generate(requests)]
    drafted, accepted = sum(r.speculation.drafted for r in results), sum(r.speculation.accepted for r in results)
    assert drafted > 0 and 0 < accepted


def test_stops_inside_an_accepted_draft_match_plain(tiny_engine, tiny_dir):
    spec = engine(tiny_dir, mode="always", k=8, drafter="exact")  # every draft accepted: stops land inside drafts
    base = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=30, ignore_eos=True)])[0]
    out = base.output_token_ids
    cases = [
        dict(stop_token_ids=[out[5]]),
        dict(stop=[tiny_engine.tokenizer.decode(out[6:8])]),
        dict(max_new_tokens=7),  # cuts a K=8 draft
        dict(max_new_tokens=10),
    ]
    for extra in cases:
        params = {"temperature": 0.0, "max_new_tokens": 30, "ignore_eos": True, **extra}
        want, got = (e.generate([req(0, "Hello there", **params)])[0] for e in (tiny_engine, spec))
        assert (got.output_token_ids, got.text, got.finish_reason) == (want.output_token_ids, want.text, want.finish_reason), extra
        assert len(got.output_token_ids) < 30
    eos = (tiny_engine.eos_token_ids, spec.eos_token_ids)
    tiny_engine.eos_token_ids = spec.eos_token_ids = frozenset({out[4]})
    try:
        want, got = (e.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=30)])[0] for e in (tiny_engine, spec))
        assert got.output_token_ids == want.output_token_ids and got.finish_reason == "stop"
    finally:
        tiny_engine.eos_token_ids, spec.eos_token_ids = eos


def test_unquantized_drafter_accepts_every_token(tiny_dir):
    spec = engine(tiny_dir, mode="always", k=4, drafter="exact")
    for temperature in (0.0, 1.0):
        results = spec.generate([req(i, p, temperature=temperature, max_new_tokens=21, seed=i, ignore_eos=True) for i, p in enumerate(PROMPTS)])
        drafted, accepted = sum(r.speculation.drafted for r in results), sum(r.speculation.accepted for r in results)
        assert drafted > 0 and accepted == drafted


def _ks_uniform(values: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the sample from Uniform(0, 1)."""
    x = np.sort(values)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max()))


def _pit(probs: torch.Tensor, tokens: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Randomised probability integral transform: Uniform(0,1) iff tokens ~ probs (rows)."""
    cdf = probs.double().cumsum(-1)
    upper = cdf.gather(-1, tokens[:, None]).squeeze(-1).numpy()
    p = probs.double().gather(-1, tokens[:, None]).squeeze(-1).numpy()
    return upper - p + rng.random(len(p)) * p


@torch.no_grad()
def sampled_pits(hf, results, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """PITs of every token after the first (those come from speculative steps) of n samples of one
    prompt under the reference's top-k-filtered distribution, and the same under a distribution
    shifted by one token: Uniform(0, 1) only if the samples follow the reference."""
    rng = np.random.default_rng(0)
    prompt = results[0].prompt_token_ids
    ids = torch.tensor([prompt + r.output_token_ids for r in results])
    logits = hf(ids).logits[:, len(prompt) - 1 : -1].float()  # [n, T, V]
    pits, shifted = [], []
    for pos in range(1, logits.shape[1]):
        probs = torch.softmax(logits[:, pos], -1)
        top = probs.topk(top_k, dim=-1)
        filtered = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        filtered /= filtered.sum(-1, keepdim=True)
        pits.append(_pit(filtered, ids[:, len(prompt) + pos], rng))
        shifted.append(_pit(filtered.roll(1, dims=-1), ids[:, len(prompt) + pos], rng))
    return np.concatenate(pits), np.concatenate(shifted)


def test_verify_is_distribution_exact_and_a_biased_verifier_is_caught():
    torch.manual_seed(0)
    V, K, n = 6, 3, 6000
    p_t = torch.softmax(torch.randn(K + 1, V) * 1.5, -1)
    p_d = torch.softmax(torch.randn(K, V) * 1.5, -1)  # a poor drafter
    rng = np.random.default_rng(0)
    drafts = torch.multinomial(p_d.repeat(n, 1), 1).view(n, K)
    args = (drafts, p_d.expand(n, K, V), p_t.expand(n, K + 1, V), p_t.argmax(-1).expand(n, K + 1),
            torch.zeros(n, dtype=torch.bool), torch.from_numpy(rng.random((n, K))), torch.from_numpy(rng.random((n, K + 1))))
    n_acc, emitted = verify(*args)
    assert 0 < n_acc.float().mean() < K
    # every emitted position j (for rows that reached it) must be distributed as p_t[j]
    for j in range(K + 1):
        reached = n_acc >= j
        pit = _pit(p_t[j].expand(int(reached.sum()), V), emitted[reached, j], rng)
        assert _ks_uniform(pit) < 1.95 / np.sqrt(len(pit)), j  # p = 0.001
    # the same check catches a verifier that keeps every draft (i.e. samples the drafter)
    pit = _pit(p_t[0].expand(n, V), drafts[:, 0], rng)
    assert _ks_uniform(pit) > 1.95 / np.sqrt(n)


@pytest.mark.parametrize("coupling", ["race", "rejection"])
def test_engine_sampling_follows_the_target_with_a_poor_drafter(tiny_dir, coupling):
    spec = engine(tiny_dir, mode="always", k=3, drafter="exact", coupling=coupling)
    torch.manual_seed(1)
    for q in spec.drafter.linears:  # make the drafter deliberately poor
        q.weight = q.weight + torch.randn_like(q.weight) * 0.01
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    results = spec.generate([req(0, "The quick brown fox", temperature=1.0, top_k=50, max_new_tokens=5, n=400, seed=123, ignore_eos=True)])
    assert 0.1 < sum(r.speculation.accepted for r in results) / sum(r.speculation.drafted for r in results) < 0.9
    pits, shifted = sampled_pits(hf, results, top_k=50)
    assert _ks_uniform(pits) < 1.95 / np.sqrt(len(pits))
    assert _ks_uniform(shifted) > 1.95 / np.sqrt(len(pits))  # the statistic has power


def test_drafter_follows_weight_updates(tiny_dir, tmp_path):
    spec = engine(tiny_dir, mode="always", k=4)
    requests = [req(i, p, temperature=0.0, max_new_tokens=24, ignore_eos=True) for i, p in enumerate(PROMPTS)]

    def acceptance() -> float:
        results = spec.generate(requests)
        return sum(r.speculation.accepted for r in results) / sum(r.speculation.drafted for r in results)

    before = acceptance()
    build_tiny_checkpoint(tmp_path, "llama", seed=7)
    spec.update_weights(tmp_path, version=1)
    assert spec.drafter.stale  # re-quantization is off the update's critical path...
    after = acceptance()  # ...but done before the first draft of the new weights
    assert not spec.drafter.stale and spec.drafter.requantize_s > 0
    assert after > 0.6 and after > before - 0.2, (before, after)
    spec.update_weights(tmp_path, version=2)
    spec.settle()  # what an idle engine process does right after reporting the new version
    assert not spec.drafter.stale
    # a drafter left on the old weights would have collapsed
    for q in spec.drafter.linears:
        old = q._source[0]
        q._source = (type(old)(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device),)
        torch.nn.init.normal_(q._source[0].weight, std=0.3)
        q.requantize()
    assert acceptance() < after - 0.3


def _top2_gap_noise(engine: NativeEngine, results, hf) -> float:
    """bf16's own noise on the quantity that decides a greedy token, measured on this engine:
    the largest error of the top-2 logit gap (against fp32) over every position of `results`,
    computed step-shaped (one token per forward, as plain decoding does) plus the largest
    computed verify-shaped (all tokens in one forward, as a verify pass does). A greedy token
    can flip between the two paths only where the fp32 gap is below that sum."""
    r = engine.runner
    step_err, verify_err = [], []
    for x in results:
        p, o = x.prompt_token_ids, x.output_token_ids
        with torch.inference_mode():
            first = r.prefill([p], [0]).float().cpu()
            steps = torch.cat([first] + [r.decode([t], [len(p) + i]).float().cpu() for i, t in enumerate(o[:-1])])
            r.prefill([p], [0])
            tokens = torch.tensor([o[:-1]], device=r.device)
            positions = torch.arange(len(p), len(p) + len(o) - 1, device=r.device)[None]
            verified = torch.cat([first, r.forward(tokens, positions, len(p) + len(o) - 1)[0].float().cpu()])
            truth = hf(torch.tensor([p + o])).logits[0, len(p) - 1 : -1]
        top2 = truth.topk(2, dim=-1).indices

        def gap(logits):
            return (logits.gather(-1, top2[:, :1]) - logits.gather(-1, top2[:, 1:])).squeeze(-1)

        step_err.append((gap(steps) - gap(truth)).abs().max())
        verify_err.append((gap(verified) - gap(truth)).abs().max())
    return float(max(step_err) + max(verify_err))


def test_bf16_divergences_from_plain_are_precision_noise(tiny_dir):
    """bf16 has no exact greedy identity: a verify over K+1 positions rounds differently from
    single steps, and a near-tie can flip. The test measures bf16's own noise floor here, on
    this CPU, and requires speculation to stay inside it: (1) every divergence from plain sits
    at a position whose fp32 top-2 gap is within the measured bf16 noise on that gap, and
    (2) speculation diverges from plain no more often than plain bf16 diverges from itself
    batched vs one sequence at a time (same weights, same math, only the batch differs), with
    slack for counting noise. A real verify bug breaks (1): it diverges at decisive tokens."""
    import random

    def bf16(max_batch_size=8, **spec):
        return NativeEngine(EngineConfig(model=str(tiny_dir), dtype="bfloat16", max_batch_size=max_batch_size, max_seq_len=128,
                                         speculation=SpeculationConfig(**spec)))

    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "runs", "blue", "1", "2", "and", "of", "is"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(40)]
    requests = [req(i, p, temperature=0.0, max_new_tokens=24, ignore_eos=True) for i, p in enumerate(prompts)]
    plain_engine = bf16(mode="plain")
    plain = plain_engine.generate(requests)
    one_at_a_time = bf16(max_batch_size=1, mode="plain").generate(requests)
    spec = bf16(mode="always", k=4).generate(requests)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    def divergence_gaps(a_results, b_results) -> list[float]:
        gaps = []
        for a, b in zip(a_results, b_results):
            if a.output_token_ids == b.output_token_ids:
                continue
            j = next(i for i, (s, t) in enumerate(zip(a.output_token_ids, b.output_token_ids)) if s != t)
            with torch.no_grad():
                logits = hf(torch.tensor([a.prompt_token_ids + a.output_token_ids[:j]])).logits[0, -1]
            gaps.append(float((logits[a.output_token_ids[j]] - logits[b.output_token_ids[j]]).abs()))
        return gaps

    noise = _top2_gap_noise(plain_engine, plain, hf)
    spec_gaps, batch_gaps = divergence_gaps(plain, spec), divergence_gaps(plain, one_at_a_time)
    assert all(g <= noise for g in spec_gaps), (spec_gaps, noise)
    assert len(spec_gaps) <= 2 * len(batch_gaps) + 4, (spec_gaps, batch_gaps)
    assert sum(r.speculation.accepted for r in spec) > 0


def test_a_drafter_vocabulary_subset_stays_lossless(tiny_engine, tiny_dir):
    """With the drafter's head cut to 64 tokens, it cannot propose most tokens: greedy outputs
    still equal plain decoding and samples still follow the target."""
    spec = engine(tiny_dir, mode="always", k=4, draft_vocab=64)
    requests = [req(i, PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=24, ignore_eos=True) for i in range(8)]
    plain = [r.output_token_ids for r in tiny_engine.generate(requests)]
    assert [r.output_token_ids for r in spec.generate(requests)] == plain  # full vocabulary, counting
    assert spec.drafter.head.ids is None
    assert [r.output_token_ids for r in spec.generate(requests)] == plain  # the subset from this wave on
    assert spec.drafter.head.ids is not None and len(spec.drafter.head.ids) == 64
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    results = spec.generate([req(0, "The quick brown fox", temperature=1.0, top_k=50, max_new_tokens=5, n=400, seed=7, ignore_eos=True)])
    assert sum(r.speculation.drafted for r in results) > 0
    pits, shifted = sampled_pits(hf, results, top_k=50)
    assert _ks_uniform(pits) < 1.95 / np.sqrt(len(pits))
    assert _ks_uniform(shifted) > 1.95 / np.sqrt(len(pits))
