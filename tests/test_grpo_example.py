"""The GRPO example closes the loop on a real fleet (tiny model, 2 steps): versions advance,
every sample comes from the version the trainer asked for, rewards and log-prob gaps are finite
and the engines' log-probs match the trainer's recomputation. With bf16 engines under the fp32
trainer the example says so instead of training on the gap silently. The asynchronous mode
trains on samples at most --max-staleness versions old, and is compared with the sync modes.
Under --coupling race the sync modes sample the same tokens."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo.py"


def run_example(tiny_dir, *args: str, png: str = "") -> tuple[list[dict], dict, str]:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(tiny_dir), "--prompts", "3", "--group", "2",
                          "--max-new-tokens", "12", "--png", png, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [x for x in lines if "step" in x], lines[-1], out.stderr


def test_grpo_example_short_run(tiny_dir):
    steps, summary, stderr = run_example(tiny_dir, "--steps", "2", "--modes", "adaptive")
    assert [s["step"] for s in steps] == [0, 1]
    assert [s["published"] for s in steps] == [1, 2]  # each step publishes the next version
    for s in steps:
        assert s["sample_versions"] == [s["expected_version"]] == [s["step"]]  # on-policy: the version asked for
        assert math.isfinite(s["mean_reward"]) and 0.0 <= s["mean_reward"] <= 1.0
        assert s["engine_dtypes"] == [s["trainer_dtype"]] == ["float32"]
        assert s["logprob_gap_max"] is not None and s["logprob_gap_max"] < 1e-3  # fp32 engine vs fp32 trainer
    assert summary["adaptive-sync"]["stale_samples"] == 0 and summary["adaptive-sync"]["staleness_max"] == 0
    assert "warning" not in stderr


def test_grpo_example_warns_when_engines_run_another_precision(tiny_dir):
    [step], _, stderr = run_example(tiny_dir, "--steps", "1", "--modes", "adaptive", "--engine-dtype", "bfloat16")
    assert step["engine_dtypes"] == ["bfloat16"] and step["trainer_dtype"] == "float32"
    assert step["logprob_gap_max"] > 1e-3  # bf16 noise, reported
    assert "warning: the engines computed log-probs in bfloat16, the trainer in float32" in stderr


def test_grpo_example_compares_sync_and_async_modes(tiny_dir, tmp_path):
    png = tmp_path / "pictures" / "grpo.png"
    steps, summary, _ = run_example(tiny_dir, "--steps", "3", "--modes", "plain-sync,adaptive-sync,adaptive-async", png=str(png))
    assert summary["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert [s["step"] for s in steps] == [0, 1, 2] * 3
    asynchronous = steps[6:]
    assert [s["published"] for s in asynchronous] == [1, 2, 3]
    # batches 0 and 1 were queued at once, at version 0: step 1 trains version-0 samples with
    # version-1 weights, one version behind, never more; later batches ask for the version
    # published just before they were queued
    assert [s["expected_version"] for s in asynchronous] == [0, 0, 1]
    assert [s["staleness_max"] for s in asynchronous][:2] == [0, 1]
    assert all(s["staleness_max"] <= 1 and s["dropped_groups"] == 0 for s in asynchronous)
    assert all(min(s["sample_versions"]) >= s["expected_version"] for s in asynchronous)
    assert all(s["logprob_gap_max"] is not None and math.isfinite(s["logprob_gap_max"]) for s in asynchronous)
    for mode in ("plain-sync", "adaptive-sync"):
        assert summary[mode]["staleness_max"] == 0 and summary[mode]["stale_samples"] == 0
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:  # the trainer on the first CPU, the engines on the others
        assert summary["trainer_cpus"] == cpus[:1] and summary["engine_cpus"] == cpus[1:]
    for mode in ("adaptive-sync", "adaptive-async"):
        assert summary[mode]["step_time_ratio"] > 0 and summary[mode]["rollout_time_ratio"] > 0
    for mode in ("plain-sync", "adaptive-sync", "adaptive-async"):  # every mode's final policy (version 3), same prompts
        assert summary[mode]["final_sample_versions"] == [3] and 0.0 <= summary[mode]["final_reward"] <= 1.0


def test_grpo_example_raced_modes_sample_the_same_tokens(tiny_dir):
    """--coupling race: plain-sync and a mode that speculates on every step (always-sync) sample
    the same tokens, so their batches, rewards and trained policies are the same, and the
    comparison is speed alone."""
    steps, summary, _ = run_example(tiny_dir, "--steps", "2", "--modes", "plain-sync,always-sync", "--coupling", "race",
                                    "--eval-batches", "1")
    plain, speculative = steps[:2], steps[2:]
    assert [s["batch_digest"] for s in plain] == [s["batch_digest"] for s in speculative]
    assert [s["mean_reward"] for s in plain] == [s["mean_reward"] for s in speculative]
    assert summary["plain-sync"]["final_reward"] == summary["always-sync"]["final_reward"]
    assert summary["coupling"] == "race"
    steps, _, _ = run_example(tiny_dir, "--steps", "1", "--modes", "plain-sync,always-sync", "--eval-batches", "0")
    assert steps[0]["batch_digest"] != steps[1]["batch_digest"]  # rejection sampling (the default) draws others


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rewards_and_micro_batches_of_the_example():
    from efficientrollout.protocol import RolloutResult

    grpo = load_example()

    def reply(text: str, finish: str = "stop") -> RolloutResult:
        return RolloutResult(request_id="r", sample_index=0, policy_version=0, prompt_token_ids=[], output_token_ids=[],
                             text=text, logprobs=[], finish_reason=finish)

    count = lambda text, finish="stop": grpo.counting_reward(5, reply(text, finish))  # noqa: E731
    assert count("1, 2, 3, 4, 5") == 1.0
    assert count("1, 2, 3") == 0.6  # stopped early
    assert count("1, 2, 3, 4, 5, 6") == 0.8  # one too many
    assert count("1, 2, 4, 5") == 0.0  # skipped 3: a run of 2, then 2 numbers after it
    assert count("1, 2, 3, 4, 5", finish="length") == 0.0  # cut off at the token limit
    assert grpo.one_word_reward(reply("Blue.")) == 1.0 and grpo.one_word_reward(reply("It is blue")) == 0.5
    # n log-uniform in 4..120, the same prompts for the same step and seed
    tasks = grpo.make_tasks("mixed", 3, 8, 0)
    assert [p for p, _ in tasks] == [p for p, _ in grpo.make_tasks("mixed", 3, 8, 0)]
    assert sum("Answer in one word." in p for p, _ in tasks) == 6 and sum(p.startswith("Count from 1 to") for p, _ in tasks) == 2
    # no micro-batch pads past the budget, unless one sequence alone is longer; all indices once
    lengths = [30, 900, 40, 35, 3000, 50, 45]
    batches = grpo.micro_batches(lengths, tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2048 for b in batches)
    assert [4] in batches and [1] in batches  # the long ones train alone
    assert [48] in grpo.micro_batches([7] * 48 + [29])  # nor pad 48 short ones to a longer one's length


def test_the_loss_corrects_stale_samples_without_dropping_their_gradient(tiny_dir):
    """Stale tokens the policy has since made e times likelier, positive advantage: PPO's ratio to
    the behaviour policy is past its clip, so they give no gradient; decoupled PPO weighs them
    by that likelihood ratio (truncated at 2). On-policy both are the same update."""
    from transformers import AutoModelForCausalLM

    from efficientrollout.protocol import RolloutResult

    grpo = load_example()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)

    def sample(behaviour: list[float]) -> RolloutResult:
        return RolloutResult(request_id="r", sample_index=0, policy_version=0, prompt_token_ids=[1, 5, 7],
                             output_token_ids=[9, 11, 13], text="", logprobs=behaviour, finish_reason="stop")

    [now] = grpo.grpo_loss(model, [sample([0.0] * 3)], [1.0], clip=0.2, backward=False)

    def gradient(behaviour: list[float], correction: str) -> torch.Tensor:
        model.zero_grad()
        grpo.grpo_loss(model, [sample(behaviour)], [1.0], clip=0.2, correction=correction)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    on_policy = now.tolist()
    assert torch.allclose(gradient(on_policy, "ppo"), gradient(on_policy, "decoupled"), atol=1e-7)
    stale = (now - 1.0).tolist()  # the behaviour policy gave each token e^-1 of today's probability
    assert gradient(stale, "ppo").abs().max() == 0.0
    assert torch.allclose(gradient(stale, "decoupled"), 2.0 * gradient(on_policy, "decoupled"), rtol=1e-4, atol=1e-7)


def test_the_loss_runs_each_prompt_once_and_matches_a_forward_per_sample(tiny_dir):
    """grpo_loss runs each distinct prompt once and its replies on that prompt's keys and
    values, in micro-batches: its log-probs and gradient are those of one plain forward per
    prompt + reply (prompts of different lengths, groups split across micro-batches, a
    one-token reply)."""
    import random

    from transformers import AutoModelForCausalLM

    from efficientrollout.protocol import RolloutResult

    grpo = load_example()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.model.layers[0].requires_grad_(False)  # as the example trains the top layers only
    rng = random.Random(0)
    vocab = model.config.vocab_size
    samples = []
    for p, lengths in enumerate([[3, 3, 1, 4], [40, 2, 25, 9], [6, 30, 6, 7]]):
        prompt = [rng.randrange(vocab) for _ in range(5 + 4 * p)]
        samples += [RolloutResult(request_id=f"p{p}", sample_index=i, policy_version=0, prompt_token_ids=prompt,
                                  output_token_ids=[rng.randrange(vocab) for _ in range(n)], text="", logprobs=[],
                                  finish_reason="stop") for i, n in enumerate(lengths)]
    advantages = [rng.choice([-1.0, 0.5, 1.0]) for _ in samples]
    assert len(grpo.micro_batches([len(s.output_token_ids) - 1 for s in samples])) > 2

    model.zero_grad()
    reference, total = [], sum(len(s.output_token_ids) for s in samples)
    for s, adv in zip(samples, advantages):
        ids = torch.tensor([s.prompt_token_ids + s.output_token_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(s.prompt_token_ids) - 1: -1].float(), -1)
        lp = logp.gather(-1, torch.tensor(s.output_token_ids)[:, None]).squeeze(-1)
        (-adv * lp.sum() / total).backward()  # the on-policy PPO objective's gradient (ratio 1)
        reference.append(lp.detach())
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for s, lp in zip(samples, reference):
        s.logprobs = lp.tolist()  # on-policy: the engine's log-probs are the trainer's
    model.zero_grad()
    got = grpo.grpo_loss(model, samples, advantages, clip=0.2, correction="ppo")
    for g, r in zip(got, reference):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected):
        assert (p.grad - e).norm() <= 1e-4 * e.norm()  # fp32 rounding: ~1e-5


def test_bench_train_step_times_the_update_beside_another_version(tiny_dir):
    """scripts/bench_train_step.py: the example's update timed per batch shape, for this
    checkout's examples/grpo.py and the one given to compare (here the same file)."""
    script = EXAMPLE.parents[1] / "scripts" / "bench_train_step.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(tiny_dir), "--train-layers", "1", "--repeats", "1",
                          "--shapes", "short", "--against", str(EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["bench"] == "train_step" and [r["shape"] for r in summary["rows"]] == ["short"]
    for row in summary["rows"]:
        assert row["samples"] == 64 and row["current_s"] > 0 and row["against_s"] > 0 and row["current_vs_against"] > 0
