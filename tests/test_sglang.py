"""The SGLang backend against a real SGLang server (bundled SmolLM2, bf16).

SGLang's CPU kernel is not on PyPI, so CI cannot run these: they skip unless
EFFICIENTROLLOUT_SGLANG_PYTHON names a Python with sglang (and, on a CPU, its CPU kernel)
installed; EFFICIENTROLLOUT_SGLANG_ARGS adds server flags (e.g. an attention backend). Run one
SGLang test at a time on a 2-core machine: a busy core slows a CPU server 40x.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from fleet_helpers import Redis, wait_for
from reference import reference_logprobs

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.engines.sglang import SGLangConfig, SGLangEngine
from efficientrollout.engines.sglang.server import SGLangServerError
from efficientrollout.models import WeightError, read_state_dict
from efficientrollout.models.checkpoint import bundled_model_dir
from efficientrollout.pipeline.fleet import Fleet
from efficientrollout.policies import PolicyPublisher
from efficientrollout.protocol import ChatMessage, RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig

PYTHON = os.environ.get("EFFICIENTROLLOUT_SGLANG_PYTHON")
ARGS = os.environ.get("EFFICIENTROLLOUT_SGLANG_ARGS", "")
pytestmark = pytest.mark.skipif(not PYTHON, reason="needs SGLang with its CPU kernel (not on PyPI): set EFFICIENTROLLOUT_SGLANG_PYTHON")

CONFIG = EngineConfig(dtype="bfloat16", max_batch_size=8, max_seq_len=512, speculation=SpeculationConfig(mode="plain"))
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "What is 12 times 3?"]


def chat(i: int, q: str, **sampling) -> RolloutRequest:
    return RolloutRequest(id=f"q{i}", messages=[ChatMessage("user", q)], sampling=SamplingParams(**sampling))


@pytest.fixture(scope="module")
def sglang_engine(tmp_path_factory):
    try:
        engine = SGLangEngine(CONFIG, SGLangConfig(sglang_python=PYTHON, sglang_args=ARGS), workdir=tmp_path_factory.mktemp("sglang"))
    except SGLangServerError as exc:
        pytest.skip(f"SGLang did not start here: {exc}")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf32():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()


def _errors(results, hf, temperature: float) -> torch.Tensor:
    return torch.cat([(torch.tensor(r.logprobs) - reference_logprobs(hf, r.prompt_token_ids, r.output_token_ids, temperature)).abs()
                      for r in results])


def test_logprobs_are_ours_temperature_scaled_and_as_accurate_as_the_native_bf16_engine(sglang_engine, hf32):
    native = NativeEngine(CONFIG)
    for temperature in (1.0, 0.7):
        requests = [chat(i, q, n=2, temperature=temperature, top_k=50, max_new_tokens=24, seed=i) for i, q in enumerate(QUESTIONS)]
        ours, theirs = sglang_engine.generate(requests), native.generate(requests)
        assert all(r.backend == "sglang" and r.dtype == "bfloat16" and r.finish_reason != "error" for r in ours)
        # the prompts are encoded identically by both backends
        assert [r.prompt_token_ids for r in ours] == [r.prompt_token_ids for r in theirs]
        err, floor = _errors(ours, hf32, temperature), _errors(theirs, hf32, temperature)
        assert err.mean() <= 2 * floor.mean() + 0.01, (temperature, err.mean(), floor.mean())
        if temperature != 1.0:  # log_softmax(logits / T), not of the raw logits
            assert _errors(ours, hf32, 1.0).mean() > 5 * err.mean()
    greedy = sglang_engine.generate([chat(i, q, temperature=0.0, max_new_tokens=16) for i, q in enumerate(QUESTIONS)])
    assert _errors(greedy, hf32, 1.0).mean() < 0.1  # greedy: T = 1


def test_sampling_parameters_are_honoured(sglang_engine):
    [stopped] = sglang_engine.generate([chat(0, "Count from 1 to 20, separated by commas.", temperature=0.0, max_new_tokens=60,
                                             stop=["5"])])
    assert stopped.finish_reason == "stop" and "5" not in stopped.text
    [capped] = sglang_engine.generate([chat(1, "Tell me a long story.", temperature=1.0, max_new_tokens=7, ignore_eos=True, seed=3)])
    assert capped.finish_reason == "length" and len(capped.output_token_ids) == 7 == len(capped.logprobs)
    many = sglang_engine.generate([chat(2, "Name an animal.", n=4, temperature=1.0, max_new_tokens=8)])
    assert sorted(r.sample_index for r in many) == [0, 1, 2, 3]
    bad = sglang_engine.generate([RolloutRequest(id="empty", messages=[]), RolloutRequest(id="ids", prompt_token_ids=[10**9]),
                                  RolloutRequest(id="long", prompt_token_ids=[5] * 600), chat(3, "Hi", max_new_tokens=4)])
    assert [r.finish_reason == "error" for r in bad] == [True, True, True, False]


def test_weight_updates_change_outputs_and_bad_weights_keep_the_old_version(sglang_engine, tmp_path):
    prompt = [chat(0, "Describe the sea.", temperature=0.0, max_new_tokens=16, ignore_eos=True)]
    before = sglang_engine.generate(prompt)[0]
    state = read_state_dict(bundled_model_dir())
    changed = {k: (v * 1.2 if "mlp" in k else v) for k, v in state.items()}
    assert sglang_engine.update_weights(changed, version=1) > 0
    # the second run: the prompt's KV then comes from SGLang's prefix cache, as in every later run
    # (a cold and a cached prefill round differently in bf16, enough to flip a near-tie)
    after = [sglang_engine.generate(prompt)[0] for _ in range(2)][-1]
    assert after.policy_version == 1 and after.output_token_ids != before.output_token_ids
    bad = dict(state)
    bad["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    with pytest.raises(WeightError, match="non-finite"):
        sglang_engine.update_weights(bad, version=2)
    with pytest.raises(WeightError, match="shape"):
        sglang_engine.update_weights({**state, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, version=2)
    still = sglang_engine.generate(prompt)[0]
    assert still.policy_version == 1 and still.output_token_ids == after.output_token_ids
    sglang_engine.update_weights(state, version=3)  # back to the original weights, under a new version
    assert sglang_engine.generate(prompt)[0].output_token_ids == before.output_token_ids


def test_a_fleet_of_sglang_engines_survives_its_server_dying_mid_wave(tmp_path, redis_server):
    q = Redis(redis_server.url)
    engine_args = ["--backend", "sglang", "--sglang-python", PYTHON, f"--sglang-args={ARGS}", "--dtype", "bfloat16",
                   "--max-batch-size", "8", "--max-seq-len", "512", "--wave-size", "8", "--lease-ms", "60000"]
    with Fleet(1, redis_url=redis_server.url, workdir=tmp_path / "fleet", engine_args=engine_args, threads_per_engine=2) as f:
        requests = [chat(i, QUESTIONS[i % 4], n=2, temperature=1.0, max_new_tokens=24 + 40 * (i % 3), ignore_eos=True, seed=i)
                    for i in range(8)]
        for r in requests:
            q.submit(r)
        wait_for(lambda: len(q.results()) >= 2, 300, "the first results")
        server = _sglang_server_pid(f.engines[0].pid)
        os.killpg(server, signal.SIGKILL)  # the server dies mid-wave; the engine process must not
        wait_for(lambda: len({(r.request_id, r.sample_index) for r in q.results()}) >= 16, 600, "every sample")
        results = q.results()
        assert {(r.request_id, r.sample_index) for r in results} == {(f"q{i}", s) for i in range(8) for s in range(2)}
        assert all(r.finish_reason == "length" and r.backend == "sglang" and r.policy_version == 0 for r in results)
        assert f.engines[0].poll() is None and _sglang_server_pid(f.engines[0].pid) != server  # restarted
        PolicyPublisher(f.policy_url, f.token).publish({k: v * 1.01 for k, v in read_state_dict(bundled_model_dir()).items()})
        wait_for(lambda: q.engine_version("engine-1") == 1, 300, "version 1 served by SGLang")
        q.submit(chat(99, "Hello", temperature=0.0, max_new_tokens=4, ignore_eos=True))
        wait_for(lambda: any(r.request_id == "q99" for r in q.results()), 120, "a result at version 1")
        assert next(r for r in q.results() if r.request_id == "q99").policy_version == 1


def _sglang_server_pid(engine_pid: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(engine_pid)], capture_output=True, text=True).stdout.split()
    [server] = [int(c) for c in children if "sglang.launch_server" in open(f"/proc/{c}/cmdline").read().replace("\0", " ")]
    return server
