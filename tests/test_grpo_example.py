"""The GRPO example closes the loop on a real fleet (tiny model, 2 steps): versions advance,
every sample comes from the version the trainer asked for, rewards and log-prob gaps are finite
and the engines' log-probs match the trainer's recomputation. With bf16 engines under the fp32
trainer the example says so instead of training on the gap silently."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo.py"


def run_example(tiny_dir, *args: str) -> tuple[list[dict], dict, str]:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(tiny_dir), "--prompts", "3", "--group", "2",
                          "--max-new-tokens", "12", "--modes", "adaptive", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [x for x in lines if "step" in x], lines[-1], out.stderr


def test_grpo_example_short_run(tiny_dir):
    steps, summary, stderr = run_example(tiny_dir, "--steps", "2")
    assert [s["step"] for s in steps] == [0, 1]
    assert [s["published"] for s in steps] == [1, 2]  # each step publishes the next version
    for s in steps:
        assert s["sample_versions"] == [s["expected_version"]] == [s["step"]]  # on-policy: the version asked for
        assert math.isfinite(s["mean_reward"]) and 0.0 <= s["mean_reward"] <= 1.0
        assert s["engine_dtypes"] == [s["trainer_dtype"]] == ["float32"]
        assert s["logprob_gap_max"] is not None and s["logprob_gap_max"] < 1e-3  # fp32 engine vs fp32 trainer
    assert summary["adaptive"]["stale_samples"] == 0
    assert "warning" not in stderr


def test_grpo_example_warns_when_engines_run_another_precision(tiny_dir):
    [step], _, stderr = run_example(tiny_dir, "--steps", "1", "--engine-dtype", "bfloat16")
    assert step["engine_dtypes"] == ["bfloat16"] and step["trainer_dtype"] == "float32"
    assert step["logprob_gap_max"] > 1e-3  # bf16 noise, reported
    assert "warning: the engines computed log-probs in bfloat16, the trainer in float32" in stderr
