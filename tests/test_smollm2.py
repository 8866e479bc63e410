"""Integration on the bundled SmolLM2-135M-Instruct (converted from its GGUF on first use)."""

from __future__ import annotations

import torch
from reference import greedy_reference, reference_logprobs
from transformers import AutoModelForCausalLM

from efficientrollout.protocol import ChatMessage, RolloutRequest, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 3 + 4?"]


def test_bundled_model_greedy_chat_matches_transformers(smollm2_engine):
    engine = smollm2_engine
    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32).eval()
    requests = [
        RolloutRequest(id=str(i), messages=[ChatMessage("user", q)], sampling=SamplingParams(temperature=0.0, max_new_tokens=24))
        for i, q in enumerate(QUESTIONS)
    ]
    results = engine.generate(requests)
    assert "Paris" in results[0].text
    for r in results:
        assert r.output_token_ids == greedy_reference(hf, r.prompt_token_ids, 24, eos=set(engine.eos_token_ids))
        gap = (torch.tensor(r.logprobs) - reference_logprobs(hf, r.prompt_token_ids, r.output_token_ids, 0.0)).abs().max()
        assert gap < 1e-4, gap


def test_bundled_model_stop_string_and_sampling(smollm2_engine):
    r = smollm2_engine.generate([
        RolloutRequest(id="s", messages=[ChatMessage("user", "Count from 1 to 10, separated by commas.")],
                       sampling=SamplingParams(temperature=0.0, max_new_tokens=40, stop=["5"]))
    ])[0]
    assert r.finish_reason == "stop" and "5" not in r.text and "4" in r.text
    a, b = (smollm2_engine.generate([RolloutRequest(id="t", prompt="Once upon a time", sampling=SamplingParams(temperature=1.0, max_new_tokens=16, seed=11))])[0] for _ in range(2))
    assert a.output_token_ids == b.output_token_ids and all(lp <= 0 for lp in a.logprobs)
