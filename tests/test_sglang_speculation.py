"""Our self-drafter inside a real SGLang server (`--speculative-algorithm EFFICIENTROLLOUT`).

Needs what tests/test_sglang.py needs (EFFICIENTROLLOUT_SGLANG_PYTHON: a Python with sglang and,
on a CPU, its kernel) plus this package installed in that Python (its `sglang.srt.plugins`
entry point registers the algorithm). CI has neither: these skip there. SGLang's CPU kernels
are bf16-only, so exactness is shown against bf16 noise measured in the same test.
"""

from __future__ import annotations

import os
import statistics
import subprocess

import numpy as np
import pytest
import torch
from reference import reference_logprobs
from test_speculation import _ks_uniform, sampled_pits

from efficientrollout.engines.native import EngineConfig
from efficientrollout.engines.sglang import SGLangConfig, SGLangEngine
from efficientrollout.engines.sglang.server import SGLangServerError
from efficientrollout.models import read_state_dict
from efficientrollout.models.checkpoint import bundled_model_dir
from efficientrollout.protocol import ChatMessage, RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig

PYTHON = os.environ.get("EFFICIENTROLLOUT_SGLANG_PYTHON")
ARGS = os.environ.get("EFFICIENTROLLOUT_SGLANG_ARGS", "")


def _plugin_installed() -> bool:
    probe = "from importlib.metadata import entry_points; import sys; " \
            "sys.exit(0 if any(e.name == 'efficientrollout' for e in entry_points(group='sglang.srt.plugins')) else 1)"
    return subprocess.run([PYTHON, "-c", probe], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.skipif(not PYTHON, reason="needs SGLang with its CPU kernel (not on PyPI): set EFFICIENTROLLOUT_SGLANG_PYTHON"),
    pytest.mark.skipif(bool(PYTHON) and not _plugin_installed(), reason="efficientrollout is not installed in SGLang's Python"),
]

PROMPTS = ["Write a short story about a cat.", "Explain how rain forms.", "List five fruits and their colors.",
           "Describe a busy market.", "What makes a good friend?", "Tell me about the moon.", "How do birds fly?",
           "Give advice to a new student."]


def chat(i: int, q: str, **sampling) -> RolloutRequest:
    return RolloutRequest(id=f"q{i}", messages=[ChatMessage("user", q)], sampling=SamplingParams(**sampling))


def start(tmp_path, speculation: str, mode: str = "always", k: int = 4, k_max: int = 8, batch: int = 8) -> SGLangEngine:
    config = EngineConfig(dtype="bfloat16", max_batch_size=batch, max_seq_len=512,
                          speculation=SpeculationConfig(mode=mode, k=k, k_max=k_max))
    try:
        return SGLangEngine(config, SGLangConfig(sglang_python=PYTHON, sglang_speculation=speculation, sglang_args=ARGS),
                            workdir=tmp_path)
    except SGLangServerError as exc:
        pytest.skip(f"SGLang did not start here: {exc}")


def greedy_wave(engine: SGLangEngine, n_tokens: int = 64):
    return engine.generate([chat(i, p, temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True) for i, p in enumerate(PROMPTS)])


def acceptance(results) -> float:
    return sum(r.speculation.accepted for r in results) / max(1, sum(r.speculation.drafted for r in results))


@pytest.fixture(scope="module")
def hf32():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def plain_greedy(tmp_path_factory):
    """SGLang without speculation: the outputs speculation must reproduce."""
    engine = start(tmp_path_factory.mktemp("plain"), "none", mode="plain")
    try:
        return greedy_wave(engine)
    finally:
        engine.close()


@torch.no_grad()
def _top2_gap(hf, prompt: list[int], prefix: list[int]) -> float:
    """fp32 log-prob gap between the two most likely next tokens after prompt + prefix."""
    logits = hf(torch.tensor([prompt + prefix])).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(2).values
    return float(top[0] - top[1])


def test_greedy_output_is_sglangs_own_except_at_bf16_near_ties(tmp_path, plain_greedy, hf32):
    engine = start(tmp_path, "efficientrollout", mode="always", k=4)
    try:
        ours = greedy_wave(engine)
    finally:
        engine.close()
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == 64 for r in ours)
    assert acceptance(ours) > 0.5  # the draft is the served model: most drafts are right
    # bf16 noise, measured: how far either run's log-probs stray from fp32 on its own tokens
    noise = max(float((torch.tensor(r.logprobs) - reference_logprobs(hf32, r.prompt_token_ids, r.output_token_ids, 1.0)).abs().max())
                for r in [*ours, *plain_greedy])
    diverged = []
    for a, b in zip(plain_greedy, ours):
        j = next((i for i, (x, y) in enumerate(zip(a.output_token_ids, b.output_token_ids)) if x != y), None)
        if j is None:
            continue
        gap = _top2_gap(hf32, a.prompt_token_ids, a.output_token_ids[:j])
        diverged.append(j)
        # a near-tie that bf16 rounding may flip either way (SmolLM2's chat outputs are full of them:
        # plain SGLang diverges from itself between two batchings too); a wrong verify diverges anywhere
        assert gap <= 2 * noise, (a.request_id, j, gap, noise)
    print(f"diverged at {diverged} of 64 tokens; bf16 noise {noise:.3f}")


def test_sampling_follows_the_target_distribution(tmp_path, hf32):
    engine = start(tmp_path, "efficientrollout", mode="always", k=3, batch=16)
    try:
        results = engine.generate([chat(0, "Say any word you like.", n=400, temperature=1.0, top_k=50, max_new_tokens=5,
                                        ignore_eos=True)])
    finally:
        engine.close()
    assert 0.05 < acceptance(results) < 1.0
    pits, shifted = sampled_pits(hf32, results, top_k=50)
    bound = 1.95 / np.sqrt(len(pits))  # p = 0.001
    assert _ks_uniform(pits) < bound
    assert _ks_uniform(shifted) > bound  # the statistic has power: a biased sampler is caught


def test_the_draft_follows_weight_updates(tmp_path):
    engine = start(tmp_path, "efficientrollout", mode="always", k=4)
    try:
        before = greedy_wave(engine, 48)
        state = read_state_dict(bundled_model_dir())
        layers = sorted({k.split(".")[2] for k in state if k.startswith("model.layers.")}, key=int)
        # very different weights: each layer's weights moved to the next layer; a draft left on the
        # old weights would agree with the new model about as often as two different models do
        rolled = dict(state)
        for i, layer in enumerate(layers):
            nxt = layers[(i + 1) % len(layers)]
            for k, v in state.items():
                if k.startswith(f"model.layers.{layer}."):
                    rolled[k.replace(f"model.layers.{layer}.", f"model.layers.{nxt}.")] = v
        engine.update_weights(rolled, version=1)
        after = greedy_wave(engine, 48)
    finally:
        engine.close()
    assert all(r.policy_version == 1 for r in after)
    assert sum(a.output_token_ids != b.output_token_ids for a, b in zip(before, after)) >= len(after) // 2  # new weights serve
    assert acceptance(before) > 0.5 and acceptance(after) > 0.5, (acceptance(before), acceptance(after))


def test_the_gate_follows_what_it_measures_on_the_full_batch_and_in_the_tail(tmp_path):
    """Whether speculation pays at a batch size depends on the machine (on GPUs a full batch is
    compute-bound; on this CPU SGLang's bf16 linears are slow at large batches and the int8 draft
    is not): the gate must try both and then mostly do whichever its own steps show is cheaper."""
    engine = start(tmp_path, "efficientrollout", mode="adaptive", batch=32)
    try:
        lengths = [320, 320] + [24] * 30  # an RL-shaped wave: a full batch, then a long tail of two
        results = engine.generate([chat(i, PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=n, ignore_eos=True)
                                   for i, n in enumerate(lengths)])
        trace = engine.trace
    finally:
        engine.close()
    assert [len(r.output_token_ids) for r in results] == lengths
    for name, steps in (("full batch", [s for s in trace if s.batch >= 16]), ("tail", [s for s in trace if s.batch <= 2])):
        plain, spec = [s for s in steps if s.k == 0], [s for s in steps if s.k > 0]
        assert plain and spec, name  # both measured
        cost = statistics.median(s.seconds / s.emitted for s in spec) / statistics.median(s.seconds / s.emitted for s in plain)
        share = len(spec) / len(steps)
        print(f"{name}: speculative / plain seconds per token {cost:.2f}; {share:.0%} of {len(steps)} steps speculated")
        if cost < 0.9:
            assert share >= 0.5, (name, cost, share)
        if cost > 1.1:
            assert share <= 0.25, (name, cost, share)  # exploration only
