"""The native engine on a tiny random Llama: exactness against transformers, seeds, stops, n,
batching, weight updates and bad input."""

from __future__ import annotations

import pytest
import torch
from reference import greedy_reference, reference_logprobs
from transformers import AutoModelForCausalLM

from efficientrollout.models import WeightError, read_state_dict
from efficientrollout.protocol import ChatMessage, RolloutRequest, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3 4", "What is the capital of France?", "a", "Once upon a time in a land far away, there lived"]


def req(i, prompt, **sampling) -> RolloutRequest:
    return RolloutRequest(id=f"r{i}", prompt=prompt, sampling=SamplingParams(**sampling))


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_greedy_matches_transformers_batched_and_unbatched(tiny_engine, hf_model):
    requests = [req(i, p, temperature=0.0, max_new_tokens=24, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    batched = tiny_engine.generate(requests)
    for r, request in zip(batched, requests):
        expected = greedy_reference(hf_model, r.prompt_token_ids, 24, eos=set())
        assert r.output_token_ids == expected, request.prompt
        single = tiny_engine.generate([request])[0]
        assert single.output_token_ids == expected
        ref_lp = reference_logprobs(hf_model, r.prompt_token_ids, r.output_token_ids, 0.0)
        assert torch.allclose(torch.tensor(r.logprobs), ref_lp, atol=1e-4, rtol=0)


def test_sampled_logprobs_match_trainer_recompute(tiny_engine, hf_model):
    for temperature in (1.0, 0.7):
        requests = [req(i, p, temperature=temperature, top_p=0.9, max_new_tokens=16, seed=i) for i, p in enumerate(PROMPTS)]
        for r in tiny_engine.generate(requests):
            ref_lp = reference_logprobs(hf_model, r.prompt_token_ids, r.output_token_ids, temperature)
            assert torch.allclose(torch.tensor(r.logprobs), ref_lp, atol=1e-4, rtol=0)


def test_same_seed_same_output_whatever_the_batch(tiny_engine):
    target = req(0, "The quick brown fox", temperature=1.0, max_new_tokens=20, seed=1234)
    alone = tiny_engine.generate([target])[0]
    neighbours = [req(i, p, temperature=0.8, top_k=5, top_p=0.5, max_new_tokens=7 + i) for i, p in enumerate(PROMPTS, start=1)]
    crowded = next(r for r in tiny_engine.generate(neighbours[:3] + [target] + neighbours[3:]) if r.request_id == "r0")
    assert crowded.output_token_ids == alone.output_token_ids
    other_seed = tiny_engine.generate([req(0, "The quick brown fox", temperature=1.0, max_new_tokens=20, seed=4321)])[0]
    assert other_seed.output_token_ids != alone.output_token_ids


def test_n_samples_are_distinct_and_complete(tiny_engine):
    results = tiny_engine.generate([req(0, "Hello", temperature=1.0, n=5, max_new_tokens=12, seed=7, ignore_eos=True)])
    assert [r.sample_index for r in results] == [0, 1, 2, 3, 4]
    assert all(len(r.output_token_ids) == 12 and r.finish_reason == "length" for r in results)
    assert len({tuple(r.output_token_ids) for r in results}) == 5


def test_samples_of_one_prompt_are_prefilled_once(tiny_engine, hf_model):
    """A request's n samples (a GRPO group) share its prompt: the model runs over it once and
    the other samples' cache slots get copies of its K/V. Every sample still decodes exactly:
    greedy ones as transformers does, sampled ones with log-probs a recompute agrees with."""
    forwards = []
    hook = tiny_engine.decoder.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    try:
        results = tiny_engine.generate([req(0, "The quick brown fox", temperature=0.0, n=3, max_new_tokens=16, ignore_eos=True),
                                        req(1, "Hello there", temperature=1.0, n=4, max_new_tokens=16, seed=3, ignore_eos=True)])
    finally:
        hook.remove()
    widths = {len(r.prompt_token_ids) for r in results}
    assert forwards[0] == (2, max(widths))  # one row per prompt, not seven
    greedy, sampled = results[:3], results[3:]
    expected = greedy_reference(hf_model, greedy[0].prompt_token_ids, 16, eos=set())
    assert all(r.output_token_ids == expected for r in greedy)
    assert len({tuple(r.output_token_ids) for r in sampled}) == 4
    for r in sampled:
        ref_lp = reference_logprobs(hf_model, r.prompt_token_ids, r.output_token_ids, 1.0)
        assert torch.allclose(torch.tensor(r.logprobs), ref_lp, atol=1e-4, rtol=0)


def test_the_prefill_budget_counts_a_shared_prompt_once(tiny_dir):
    """max_prefill_tokens bounds the rows a prefill forward computes: a request's 6 samples,
    one prompt, are admitted together under a budget that two different prompts exceed."""
    from conftest import PLAIN

    from efficientrollout.engines.native import EngineConfig, NativeEngine

    prompt = "The quick brown fox jumps over"
    width = len(NativeEngine(EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=64, speculation=PLAIN))
                .generate([req(0, prompt, max_new_tokens=1)])[0].prompt_token_ids)
    engine = NativeEngine(EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=64, max_prefill_tokens=width,
                                       speculation=PLAIN))
    forwards = []
    engine.decoder.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    engine.generate([req(0, prompt, n=6, max_new_tokens=1)])
    assert forwards == [(1, width)]  # one forward, one row, for all six samples
    forwards.clear()
    engine.generate([req(0, prompt, max_new_tokens=1), req(1, prompt.upper(), max_new_tokens=1)])
    assert len(forwards) == 2  # two prompts: over the budget together


def test_top_k_one_is_greedy_and_top_p_restricts_support(tiny_engine, hf_model):
    greedy = tiny_engine.generate([req(0, "Once upon", temperature=0.0, max_new_tokens=10, ignore_eos=True)])[0]
    topk1 = tiny_engine.generate([req(0, "Once upon", temperature=1.5, top_k=1, max_new_tokens=10, seed=3, ignore_eos=True)])[0]
    assert topk1.output_token_ids == greedy.output_token_ids
    r = tiny_engine.generate([req(0, "Once upon", temperature=1.0, top_p=0.3, max_new_tokens=10, seed=5, ignore_eos=True)])[0]
    ids = r.prompt_token_ids
    for tok in r.output_token_ids:
        probs = torch.softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        sorted_p, order = probs.sort(descending=True)
        nucleus = order[: int(((sorted_p.cumsum(0) - sorted_p) < 0.3).sum())].tolist()
        assert tok in nucleus
        ids = ids + [tok]


def test_stop_conditions(tiny_engine):
    base = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=20, ignore_eos=True)])[0]
    out = base.output_token_ids
    stop_id = out[5]
    r = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=20, stop_token_ids=[stop_id], ignore_eos=True)])[0]
    assert r.output_token_ids == out[: out.index(stop_id) + 1] and r.finish_reason == "stop"
    # a stop string taken from the middle of the greedy text: the text is cut before it
    stop_text = tiny_engine.tokenizer.decode(out[6:8])
    assert stop_text.strip(), "pick a stop string with visible text"
    r = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=20, stop=[stop_text], ignore_eos=True)])[0]
    assert r.finish_reason == "stop" and stop_text not in r.text and len(r.output_token_ids) <= 8
    assert base.text.startswith(r.text)
    r = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=3, ignore_eos=True)])[0]
    assert r.output_token_ids == out[:3] and r.finish_reason == "length"
    # EOS: make the engine treat the 4th greedy token as EOS; ignore_eos overrides it
    eos = tiny_engine.eos_token_ids
    tiny_engine.eos_token_ids = frozenset({out[3]})
    try:
        r = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=20)])[0]
        assert r.output_token_ids == out[: out.index(out[3]) + 1] and r.finish_reason == "stop"
        r = tiny_engine.generate([req(0, "Hello there", temperature=0.0, max_new_tokens=20, ignore_eos=True)])[0]
        assert r.output_token_ids == out
    finally:
        tiny_engine.eos_token_ids = eos


def test_continuous_batching_more_samples_than_slots(tiny_engine, hf_model):
    # 8 slots, 20 samples of different lengths: samples join as others leave; greedy stays exact
    requests = [req(i, PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=3 + 2 * i, ignore_eos=True) for i in range(20)]
    for r in tiny_engine.generate(requests):
        n = 3 + 2 * int(r.request_id[1:])
        assert r.output_token_ids == greedy_reference(hf_model, r.prompt_token_ids, n, eos=set())


def test_prompt_forms_and_bad_requests_become_error_results(tiny_engine):
    text = tiny_engine.generate([req(0, "Hello", temperature=0.0, max_new_tokens=4)])[0]
    ids = tiny_engine.generate([RolloutRequest(id="t", prompt_token_ids=text.prompt_token_ids, sampling=SamplingParams(temperature=0.0, max_new_tokens=4))])[0]
    assert ids.output_token_ids == text.output_token_ids
    chat = tiny_engine.generate([RolloutRequest(id="c", messages=[ChatMessage("user", "Hi")], sampling=SamplingParams(max_new_tokens=4))])[0]
    assert tiny_engine.tokenizer.decode(chat.prompt_token_ids).startswith("<|im_start|>")
    bad = [
        RolloutRequest(id="big", prompt_token_ids=[10**9]),
        RolloutRequest(id="long", prompt_token_ids=[5] * 300, sampling=SamplingParams(n=2)),
        RolloutRequest(id="future", prompt="hi", min_policy_version=99),
        RolloutRequest(id="empty", prompt=""),
    ]
    results = tiny_engine.generate(bad + [req(1, "Hello", temperature=0.0, max_new_tokens=4)])
    errors = [r for r in results if r.finish_reason == "error"]
    assert sorted(r.request_id for r in errors) == ["big", "empty", "future", "long", "long"]
    assert all(r.error for r in errors)
    assert results[-1].output_token_ids == text.output_token_ids
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def test_results_say_which_backend_and_precision_computed_their_logprobs(tiny_engine):
    ok, err = tiny_engine.generate([req(0, "Hello", max_new_tokens=2), RolloutRequest(id="bad", prompt="")])
    assert (ok.backend, ok.dtype) == (err.backend, err.dtype) == ("native", "float32")


def test_a_sample_finished_at_prefill_has_sane_timings(tiny_engine):
    # max_new_tokens=1: the first token, sampled right after prefill, finishes the sample
    [r] = tiny_engine.generate([req(0, "Hello there", max_new_tokens=1, ignore_eos=True)])
    assert len(r.output_token_ids) == 1 and r.finish_reason == "length"
    assert 0.0 <= r.timings.queued_s < 60.0 and r.timings.prefill_s > 0.0


def test_abort_between_waves_does_not_touch_the_next_wave(tiny_engine):
    tiny_engine.abort()  # nothing is generating: e.g. a worker stopping after its wave already ended
    results = tiny_engine.generate([req(i, "Hello", temperature=0.0, max_new_tokens=5, ignore_eos=True) for i in range(3)])
    assert [len(r.output_token_ids) for r in results] == [5, 5, 5]


def test_requests_that_break_encoding_or_sampling_are_their_own_errors(tiny_engine):
    requests = [
        RolloutRequest(id="no-messages", messages=[]),  # the chat template raises
        req(1, "Hello", temperature=1e-45, max_new_tokens=4),  # logits / T overflow: non-finite log-probs
        req(2, "Hello", temperature=0.0, max_new_tokens=4, ignore_eos=True),
    ]
    bad_empty, bad_temperature, good = tiny_engine.generate(requests)
    assert bad_empty.finish_reason == "error" and "empty conversation" in bad_empty.error
    assert bad_temperature.finish_reason == "error" and "log-probability" in bad_temperature.error
    assert bad_temperature.output_token_ids == [] and bad_temperature.logprobs == []
    assert good.finish_reason == "length" and len(good.output_token_ids) == 4


def test_weight_update_changes_output_and_bad_update_is_rejected(tiny_engine, tiny_dir, tmp_path):
    from conftest import PLAIN, build_tiny_checkpoint

    from efficientrollout.engines.native import EngineConfig, NativeEngine

    # long enough that its prefill runs the multi-row linears (fp32 panels on AVX-512)
    prompt = [req(0, "Once upon a time, in a land far away, there lived a", temperature=0.0, max_new_tokens=12, ignore_eos=True)]
    before = tiny_engine.generate(prompt)[0]
    original = read_state_dict(tiny_dir)
    new_dir = tmp_path / "v1"
    build_tiny_checkpoint(new_dir, "llama", seed=1)
    try:
        params_before = [p.data_ptr() for p in tiny_engine.decoder.parameters()]
        tiny_engine.update_weights(new_dir, version=1)
        assert [p.data_ptr() for p in tiny_engine.decoder.parameters()] == params_before  # in place
        after = tiny_engine.generate(prompt)[0]
        assert after.policy_version == 1 and after.output_token_ids != before.output_token_ids
        # every derived copy of the weights (fp32 panels, oneDNN's, the fused layers') was refreshed:
        # the same as an engine that loaded these weights at start-up
        fresh = NativeEngine(EngineConfig(model=str(new_dir), dtype="float32", max_batch_size=8, max_seq_len=256, speculation=PLAIN))
        again = fresh.generate(prompt)[0]
        assert again.output_token_ids == after.output_token_ids and again.logprobs == after.logprobs

        bad_shape = dict(original)
        bad_shape["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        missing = {k: v for k, v in original.items() if "layers.1." not in k}
        nan = dict(original)
        nan["model.norm.weight"] = torch.full_like(original["model.norm.weight"], float("nan"))
        for bad, match in ((bad_shape, "shape"), (missing, "missing"), (nan, "non-finite"), ({**original, "extra.weight": torch.ones(1)}, "unexpected")):
            with pytest.raises(WeightError, match=match):
                tiny_engine.update_weights(bad, version=2)
            still = tiny_engine.generate(prompt)[0]
            assert still.policy_version == 1 and still.output_token_ids == after.output_token_ids
    finally:
        tiny_engine.update_weights(original, version=0)
    assert tiny_engine.generate(prompt)[0].output_token_ids == before.output_token_ids


def test_bf16_logprobs_are_as_accurate_as_a_bf16_recompute(tiny_dir):
    """bf16 has no exact identity (op order differs between a batched prefill and a step), so
    the engine's bf16 log-probs are held to bf16's own noise floor measured here: their error
    against the fp32 truth must be no worse than transformers' bf16 recomputation's error on
    the same tokens (a trainer's bf16 forward), with a factor of 2 for the different op order."""
    from conftest import PLAIN

    from efficientrollout.engines.native import EngineConfig, NativeEngine

    engine = NativeEngine(EngineConfig(model=str(tiny_dir), dtype="bfloat16", max_batch_size=8, max_seq_len=128, speculation=PLAIN))
    hf16 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ours, theirs = [], []
    for r in engine.generate([req(i, p, temperature=1.0, max_new_tokens=16, seed=i, ignore_eos=True) for i, p in enumerate(PROMPTS)]):
        assert r.dtype == "bfloat16"
        truth = reference_logprobs(hf32, r.prompt_token_ids, r.output_token_ids, 1.0)
        ours.append((torch.tensor(r.logprobs) - truth).abs())
        theirs.append((reference_logprobs(hf16, r.prompt_token_ids, r.output_token_ids, 1.0) - truth).abs())
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    assert ours.mean() <= 2 * theirs.mean() and ours.max() <= 2 * theirs.max(), (ours.mean(), theirs.mean(), ours.max(), theirs.max())
