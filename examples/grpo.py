"""GRPO on the EfficientRollout fleet: enqueue prompts, score, learn, publish, repeat.

The task (--task mixed, the default): three quarters of the prompts are simple questions with
"Answer in one word.", rewarded by an exact format check (1 for one word that ends on its own,
0.5 for at most five words, 0 otherwise); a quarter ask to count from 1 to n (n log-uniform in
4..120), rewarded by the share of 1..n written in order, less the share of numbers after that
(0 if cut off at the token limit). The bundled 135M model at temperature 1 rambles: about 15%
of one-word replies score, and it learns them within a few steps on a CPU; counting it mostly
gets wrong, writing anything from 3 to 1024 tokens (--max-new-tokens), and a few of those
replies run to the limit in most steps: as in real RL, most responses are short, and the
prompts the policy cannot solve yet score little but decide how long each rollout takes.
(--task one-word alone: replies shorten as the reward rises and the tail is gone after two
steps; --task count alone: rewards stay near 0.) Each step:

    rollout   RolloutClient: P prompts × G samples at temperature 1, asking for the current
              version (min_policy_version); the fleet streams the results back
    reward    the checker, locally
    train     GRPO: group-normalised advantages; PPO-clipped token loss with the importance
              ratio exp(logp_trainer - logp_engine) on the log-probs the engines returned
              (each prompt runs once, its group's replies on its keys and values)
    publish   PolicyPublisher.publish(state_dict) → version v+1; engines load it between waves

Modes (--modes, each on a fresh fleet, same seeds): SPECULATION-sync waits for each batch, trains,
publishes and waits until the engines serve the new version; SPECULATION-async keeps
--max-staleness batches generating while the trainer trains (see `run`). The trainer and the
engines are pinned to separate CPUs (--engine-cpus), as they would be separate GPUs: on shared
cores the overlap could not show.

Log-prob parity: that ratio is only meaningful if the engines compute log-probs in the
trainer's precision. The trainer here is fp32, so the engines are asked for fp32 (`--engine-dtype
float32`, the default): the gap is then ~1e-5 nats. Every result says the dtype its log-probs
were computed in; with bf16 engines (`--engine-dtype auto` on a bf16-capable machine) the
example warns and reports the gap (for SmolLM2 about 0.045 nats mean, 0.3-0.5 at single
tokens), which the ratio then carries as noise.

By default it starts its own fleet (embedded Redis, policy server, one engine) once per mode
and runs plain-sync, adaptive-sync and adaptive-async, then prints the comparison. Point it at
a running fleet with --redis/--policy/--token instead. Prints a table per mode and a JSON line
last.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable

import anyio
import torch

from efficientrollout.pipeline import RolloutClient
from efficientrollout.pipeline.fleet import Fleet
from efficientrollout.policies import PolicyPublisher
from efficientrollout.protocol import (
    ChatMessage,
    RolloutRequest,
    RolloutResult,
    SamplingParams,
)
from efficientrollout.speculation import MODES

QUESTIONS = [
    "What color is the sky?", "Name an animal that lives in the sea.", "What is the capital of France?", "Name a fruit.",
    "What do bees make?", "What is frozen water called?", "Name a planet.", "What do cows drink?", "Name a vegetable.",
    "What is the opposite of hot?", "What animal barks?", "Name a metal.", "What season comes after winter?",
    "What do you use to write?", "Name a musical instrument.", "What is the largest ocean?", "Name a flower.",
    "What shape has three sides?", "What do plants need to grow?", "Name a day of the week.", "What gives us light at night?",
    "Name a bird.", "What is the color of grass?", "What do fish live in?",
]


def one_word(rng: random.Random, count: int) -> list[tuple[str, Callable[[RolloutResult], float]]]:
    return [(q + " Answer in one word.", one_word_reward) for q in rng.sample(QUESTIONS, count)]


def one_word_reward(result: RolloutResult) -> float:
    """Exact format check: one word (1.0), at most five words (0.5); only replies that ended on their own."""
    if result.finish_reason != "stop":
        return 0.0
    if re.fullmatch(r"\s*[A-Za-z][A-Za-z'-]*[.!]?\s*", result.text):
        return 1.0
    return 0.5 if len(result.text.split()) <= 5 else 0.0


def counting(rng: random.Random, count: int) -> list[tuple[str, Callable[[RolloutResult], float]]]:
    """Count to n, n log-uniform in 4..120: right answers run from ~10 to ~370 tokens."""
    ns = [round(math.exp(rng.uniform(math.log(4), math.log(120)))) for _ in range(count)]
    return [(f"Count from 1 to {n}, separated by commas.", functools.partial(counting_reward, n)) for n in ns]


def counting_reward(n: int, result: RolloutResult) -> float:
    """The share of 1..n written in order, less the share of numbers after that run (stopping
    early, skipping, overshooting all cost); 0 for a reply cut off at the token limit."""
    if result.finish_reason != "stop":
        return 0.0
    numbers = [int(x) for x in re.findall(r"\d+", result.text)]
    run = 0
    while run < min(n, len(numbers)) and numbers[run] == run + 1:
        run += 1
    return max(0.0, run / n - min(1.0, (len(numbers) - run) / n))


def mixed(rng: random.Random, count: int) -> list[tuple[str, Callable[[RolloutResult], float]]]:
    """Three quarters one-word questions, which the model learns within a few steps, a quarter
    counting, which at 135M it mostly gets wrong, often rambling for hundreds of tokens: as in
    real RL, a few responses that the policy cannot get right yet decide how long each rollout
    takes. (With half counting, 5-6 replies ran to the limit together: a batch-6 tail.)"""
    return one_word(rng, count - count // 4) + counting(rng, count // 4)


TASKS = {"one-word": one_word, "count": counting, "mixed": mixed}


def make_tasks(task: str, step: int, count: int, seed: int) -> list[tuple[str, Callable[[RolloutResult], float]]]:
    """Step `step`'s prompts, each with the reward of its replies."""
    return TASKS[task](random.Random(seed * 100_003 + step), count)


def step_requests(task: str, step: int, prompts: int, group: int, max_new_tokens: int, seed: int,
                  min_version: int = 0) -> list[tuple[RolloutRequest, Callable[[RolloutResult], float]]]:
    """Step `step`'s requests (G samples of each prompt at temperature 1, seeded per step and
    prompt), each with the reward of its replies."""
    return [(RolloutRequest(id=f"s{step}-p{i}-{time.time_ns()}", messages=[ChatMessage("user", prompt)], min_policy_version=min_version,
                            sampling=SamplingParams(n=group, temperature=1.0, max_new_tokens=max_new_tokens,
                                                    seed=seed * 1_000_003 + step * 1000 + i)), score)
            for i, (prompt, score) in enumerate(make_tasks(task, step, prompts, seed))]


def micro_batches(lengths: list[int], tokens: int = 2048, waste: float = 0.25) -> list[list[int]]:
    """Indices in length order, cut so that no micro-batch pads past `tokens` (rows x longest)
    nor pads more than `waste` of its real tokens: one long reply trains alone instead of
    padding seven short ones to its length."""
    order, batches, real = sorted(range(len(lengths)), key=lengths.__getitem__), [], 0
    for i in order:
        padded = (len(batches[-1]) + 1) * lengths[i] if batches else 0
        if batches and padded <= tokens and padded <= (1 + waste) * (real + lengths[i]):
            batches[-1].append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def grpo_loss(model, samples: list[RolloutResult], advantages: list[float], clip: float, dual_clip: float = 3.0, backward: bool = True,
              correction: str = "decoupled", weight_cap: float = 2.0):
    """Token-mean PPO-clipped loss, backpropagated in length-sorted micro-batches (micro_batches);
    returns the trainer's log-probs of the sampled tokens, for the mismatch check.

    Each distinct prompt runs once (a GRPO group's samples share it; in the one-word task the
    prompt is most of a sample's tokens): its keys and values become the past of its samples'
    replies, which run in micro-batches; their gradients add up and flow back through the
    prompts once, after the last micro-batch.
    The same computation as one forward per prompt + reply; a step shaped as this example's
    (64 samples, 48 of them one-word) took 0.62x the time on one core, and backpropagating the
    prompts once instead of after every micro-batch 0.63x again (scripts/bench_train_step.py).

    `correction="ppo"`: the ratio is the trainer's probability over the one of the engine that
    sampled the token, at the version it sampled with: for a stale sample (asynchronous mode)
    the importance weight from the behaviour policy to the current one, PPO-clipped at
    1 +- clip; for negative advantages the dual clip bounds the objective at dual_clip *
    advantage (dual-clip PPO, Ye et al. 2020). A stale token whose probability has already
    moved past the clip in its advantage's direction then gives no gradient at all.
    `"decoupled"` (decoupled PPO, as AReaL trains asynchronously): the clip is taken against the
    trainer's own policy before this update (the proximal one), and the lag is an importance
    weight, behaviour -> proximal, truncated at `weight_cap`. With the one update per batch
    made here the ratio to the proximal policy is 1 where the gradient is taken, so every
    token contributes, weighted by how much likelier the policy has since made it. On-policy
    (sync, fp32 parity) both are the same update."""
    from transformers import DynamicCache

    total_tokens = sum(len(s.output_token_ids) for s in samples)
    trainer_lps: dict[int, torch.Tensor] = {}
    body, head = model.get_decoder(), model.get_output_embeddings()
    index = {p: i for i, p in enumerate(dict.fromkeys(tuple(s.prompt_token_ids) for s in samples))}
    prompt_of = [index[tuple(s.prompt_token_ids)] for s in samples]
    prompt_ids, prompt_mask = padded(list(index))
    prompt_lens = prompt_mask.sum(1)
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    # the hidden state after each prompt's last token predicts its replies' first tokens
    roots = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
    roots.append(out.last_hidden_state[torch.arange(len(index)), prompt_lens - 1])
    # the micro-batches start from copies of these cut off the prompts' graph; their gradients
    # add up there, and flow back through the prompts once at the end, not once per micro-batch
    cut = [t.detach().requires_grad_(t.requires_grad and backward) for t in roots]
    past, last = list(zip(cut[:-1:2], cut[1:-1:2])), cut[-1]
    # a reply's tokens but the last are inputs (each predicts the next)
    for chunk in micro_batches([max(1, len(s.output_token_ids) - 1) for s in samples]):
        rows = torch.tensor([prompt_of[i] for i in chunk])
        ids, mask = padded([samples[i].output_token_ids[:-1] for i in chunk])
        hidden = body(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], 1),
                      position_ids=prompt_lens[rows, None] + torch.arange(ids.shape[1]),
                      cache=DynamicCache([(k[rows], v[rows]) for k, v in past], config=model.config),
                      use_cache=True).last_hidden_state
        lengths = [len(samples[i].output_token_ids) for i in chunk]
        states = torch.cat([torch.cat([last[p][None], hidden[row, : n - 1]])[:n] for row, (p, n) in enumerate(zip(rows.tolist(), lengths))])
        logits = head(states).float()
        targets = torch.tensor([t for i in chunk for t in samples[i].output_token_ids])
        logp = (-torch.nn.functional.cross_entropy(logits, targets, reduction="none")).split(lengths)  # fused log-softmax + pick
        loss = 0.0
        for row, i in enumerate(chunk):
            s, adv = samples[i], advantages[i]
            lp, behaviour = logp[row], torch.tensor(s.logprobs)  # the trainer's; the engine's that sampled it
            if correction == "decoupled":
                proximal = lp.detach()
                weight = torch.exp(proximal - behaviour).clamp(max=weight_cap)
                ratio = torch.exp(lp - proximal)
            else:
                weight, ratio = 1.0, torch.exp(lp - behaviour)
            objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
            if adv < 0:
                objective = torch.maximum(objective, torch.tensor(dual_clip * adv))
            objective = weight * objective
            loss = loss - objective.sum()
            trainer_lps[i] = lp.detach()
        if backward:
            (loss / total_tokens).backward()
    if backward:
        flowing = [(root, c.grad) for root, c in zip(roots, cut) if c.grad is not None]
        if flowing:
            torch.autograd.backward(*zip(*flowing))
    return [trainer_lps[i] for i in range(len(samples))]


def batch_digest(groups: list[list[RolloutResult]]) -> str:
    """A fingerprint of a step's sampled tokens, by prompt (request ids without their timestamp)
    and sample index: equal across modes exactly when they sampled the same batch (`--coupling race`)."""
    h = hashlib.sha256()
    for prompt, index, tokens in sorted((s.request_id.rsplit("-", 1)[0], s.sample_index, s.output_token_ids) for g in groups for s in g):
        h.update(f"{prompt}/{index}:{','.join(map(str, tokens))};".encode())
    return h.hexdigest()[:16]


def padded(seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 to the longest, and the mask of the real ones."""
    width = max(1, max(map(len, seqs)))
    return (torch.tensor([list(q) + [0] * (width - len(q)) for q in seqs]),
            torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs]))


async def run(a: argparse.Namespace, redis_url: str, policy_url: str, token: str, fleet: Fleet | None, asynchronous: bool) -> list[dict]:
    """The training loop. Synchronous: roll out batch t at version t, train, publish t+1, wait
    until the fleet serves it. Asynchronous: batches t+1..t+S (S = --max-staleness) generate
    while the trainer trains on batch t, so every sample is at most S versions behind the
    weights it trains; publishing does not wait for the engines (they switch between waves)."""
    from transformers import AutoModelForCausalLM

    from efficientrollout.models.checkpoint import resolve_model

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(a.model), dtype=torch.float32)
    model.requires_grad_(False)  # train the top layers only: a CPU-sized step (embeddings, tied with the head, stay)
    for layer in model.model.layers[-a.train_layers:]:
        layer.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    publisher = PolicyPublisher(policy_url, token)
    version = _current_version(policy_url)
    trainer_dtype = "float32"
    warned = False
    rows = []
    lead = a.max_staleness if asynchronous else 0  # batches generating ahead of the one trained on

    rewards_of: dict[str, Callable[[RolloutResult], float]] = {}  # request id → its reward

    def batch(step: int, min_version: int) -> list[RolloutRequest]:
        pairs = step_requests(a.task, step, a.prompts, a.group, a.max_new_tokens, a.seed, min_version)
        rewards_of.update((request.id, score) for request, score in pairs)
        return [request for request, _ in pairs]

    def train(samples: list[RolloutResult], advantages: list[float]) -> tuple[list[float], int]:
        """One update on the samples that carry a gradient; returns the log-prob gaps (trainer vs
        engine, per token) and how many samples trained. A group whose samples all scored alike
        has advantage 0 everywhere: it costs a forward and backward and moves nothing, so it is
        left out (as DAPO's dynamic sampling does)."""
        learn = [i for i, adv in enumerate(advantages) if adv != 0.0]
        if learn:
            samples, advantages = [samples[i] for i in learn], [advantages[i] for i in learn]
            model.train()
            optimizer.zero_grad()
            trainer_lps = grpo_loss(model, samples, advantages, a.clip, a.dual_clip, correction=a.correction)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        else:  # nothing to learn from: the log-prob parity check still runs, on one group
            samples = samples[: a.group]
            with torch.no_grad():
                trainer_lps = grpo_loss(model, samples, [0.0] * len(samples), a.clip, a.dual_clip, backward=False)
        return [float(x) for s, lp in zip(samples, trainer_lps) for x in (lp - torch.tensor(s.logprobs)).abs()], len(learn)

    publish_s = 0.0  # the last publish call's part of sync_s (the rest: waiting for the engines to load it)

    def publish() -> int:
        nonlocal publish_s
        t0 = time.perf_counter()
        v = publisher.publish({k: v.detach() for k, v in model.state_dict().items()})
        publish_s = time.perf_counter() - t0
        if fleet is not None and not asynchronous:
            fleet.wait_for_version(v, timeout=300)
        return v

    async with RolloutClient(redis_url) as client:
        ahead = deque([await client.start(batch(0, version))])
        for step in range(a.steps):
            t_step = time.perf_counter()
            rollout = ahead.popleft()
            groups = await rollout.groups(timeout=1800)
            rollout_s = time.perf_counter() - t_step
            if step == 0:  # the first batches to generate while the trainer trains; queued with batch 0,
                # they joined its wave and step 0 waited for both
                for later in range(1, min(lead + 1, a.steps)):
                    ahead.append(await client.start(batch(later, version)))
            assert all(s.finish_reason != "error" for g in groups for s in g), [s.error for g in groups for s in g if s.error][:3]
            # the bound: a group sampled more than `lead` versions before the weights it would
            # train is not used (min_policy_version makes that impossible on this fleet; an
            # engine that ignored it would be caught here)
            fresh = [g for g in groups if version - min(s.policy_version for s in g) <= lead]
            samples, advantages, rewards = [], [], []
            for group in fresh:
                r = [rewards_of[s.request_id](s) for s in group]
                rewards += r
                mean, std = statistics.fmean(r), statistics.pstdev(r)
                samples += group  # a group where every sample scored the same gets advantage 0: no push
                advantages += [(x - mean) / (std + 1e-6) for x in r]

            t0 = time.perf_counter()
            gaps, trained = await anyio.to_thread.run_sync(train, samples, advantages) if samples else ([], 0)
            train_s = time.perf_counter() - t0
            staleness = [version - s.policy_version for s in samples]

            t0 = time.perf_counter()
            version = await anyio.to_thread.run_sync(publish)
            sync_s = time.perf_counter() - t0
            if step + lead + 1 < a.steps:  # the next batch asks for the weights just published
                ahead.append(await client.start(batch(step + lead + 1, version)))
            step_s = time.perf_counter() - t_step

            engine_dtypes = sorted({s.dtype for s in samples})
            if engine_dtypes != [trainer_dtype] and not warned:  # the ratio exp(logp_trainer - logp_engine) is then noisy
                print(f"warning: the engines computed log-probs in {', '.join(engine_dtypes)}, the trainer in {trainer_dtype}: "
                      f"the PPO ratio carries their gap (this step: mean {statistics.fmean(gaps):.3f}, max {max(gaps):.3f} nats); "
                      f"start the engines with --dtype {trainer_dtype} for parity", file=sys.stderr, flush=True)
                warned = True
            lengths = [len(s.output_token_ids) for g in groups for s in g]
            row = {"step": step, "mean_reward": round(statistics.fmean(rewards), 3) if rewards else None,
                   "rollout_s": round(rollout_s, 2), "train_s": round(train_s, 2), "sync_s": round(sync_s, 2),
                   "publish_s": round(publish_s, 2), "step_s": round(step_s, 2), "rollout_share": round(rollout_s / step_s, 3),
                   "sample_versions": sorted({s.policy_version for g in groups for s in g}),
                   "expected_version": rollout.requests[0].min_policy_version,
                   "staleness_max": max(staleness, default=0), "staleness_mean": round(statistics.fmean(staleness), 2) if staleness else 0,
                   "dropped_groups": len(groups) - len(fresh), "trained_samples": trained,
                   "engine_dtypes": engine_dtypes, "trainer_dtype": trainer_dtype,
                   "logprob_gap_mean": round(statistics.fmean(gaps), 7) if gaps else None,
                   "logprob_gap_max": round(max(gaps), 7) if gaps else None,
                   "tokens": sum(lengths), "max_len": max(lengths), "median_len": statistics.median(lengths),
                   "batch_digest": batch_digest(groups), "published": version}
            rows.append(row)
            print(json.dumps(row), flush=True)

        # The final policy on fresh prompts (the same in every mode): a step's reward is that of
        # the policy that sampled its batch, which in asynchronous mode is one version older
        # than in synchronous mode at the same step, so last-step rewards compare v(N-1) with
        # v(N-2); this compares the policies both modes end with, after N updates each.
        evaluation = None
        if a.eval_batches:
            t0 = time.perf_counter()
            rollouts = [await client.start(batch(a.steps + i, version)) for i in range(a.eval_batches)]
            per_prompt, versions = [], set()
            for rollout in rollouts:
                for group in await rollout.groups(timeout=1800):
                    per_prompt.append(statistics.fmean(rewards_of[s.request_id](s) for s in group))
                    versions |= {s.policy_version for s in group}
            evaluation = {"eval_reward": round(statistics.fmean(per_prompt), 3),
                          "eval_reward_se": round(statistics.stdev(per_prompt) / len(per_prompt) ** 0.5, 3) if len(per_prompt) > 1 else None,
                          "eval_prompts": len(per_prompt), "eval_version": version, "eval_sample_versions": sorted(versions),
                          "eval_s": round(time.perf_counter() - t0, 2)}
            print(json.dumps(evaluation), flush=True)
    return rows, evaluation


def _current_version(policy_url: str) -> int:
    from efficientrollout.policies import PolicyClient

    return PolicyClient(policy_url).latest() or 0


def print_table(mode: str, rows: list[dict], evaluation: dict | None = None) -> None:
    print(f"\n{mode}")
    print(f"{'step':>4} {'reward':>7} {'step s':>7} {'rollout s':>10} {'train s':>8} {'sync s':>7} {'rollout %':>9} {'versions':>9} "
          f"{'stale':>6} {'gap mean':>9} {'gap max':>9} {'tokens':>7} {'max len':>7}")
    for r in rows:
        print(f"{r['step']:>4} {str(r['mean_reward']):>7} {r['step_s']:>7} {r['rollout_s']:>10} {r['train_s']:>8} {r['sync_s']:>7} "
              f"{100 * r['rollout_share']:>8.0f}% {str(r['sample_versions']):>9} {r['staleness_max']:>6} "
              f"{str(r['logprob_gap_mean']):>9} {str(r['logprob_gap_max']):>9} {r['tokens']:>7} {r['max_len']:>7}")
    if evaluation:
        print(f"final policy (version {evaluation['eval_version']}) on {evaluation['eval_prompts']} fresh prompts: "
              f"reward {evaluation['eval_reward']} +- {evaluation['eval_reward_se']}")


def plot_modes(results: dict[str, tuple[list[dict], dict | None]], path: str, title: str) -> None:
    """Per step and mode, side by side: the step's time as rollout (the trainer waiting for its
    batch), training and weight sync, stacked; below, each step's mean reward (the final
    policy's on fresh prompts in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times, rewards) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=(2, 1))
    width = 0.8 / len(results)
    for m, (mode, (rows, evaluation)) in enumerate(results.items()):
        steps = [r["step"] for r in rows]
        x = [step + (m - (len(results) - 1) / 2) * width for step in steps]
        below = [0.0] * len(rows)
        for key, part, alpha in (("rollout_s", "rollout", 1.0), ("train_s", "train", 0.55), ("sync_s", "sync", 0.25)):
            v = [r[key] for r in rows]
            times.bar(x, v, width, bottom=below, color=f"C{m}", alpha=alpha, edgecolor="white", lw=0.5,
                      label=f"{mode}: {part} ({sum(v):.0f} s)")
            below = [b + t for b, t in zip(below, v)]
        final = f", final policy {evaluation['eval_reward']} ± {evaluation['eval_reward_se']}" if evaluation else ""
        rewards.plot(steps, [r["mean_reward"] for r in rows], "o-", color=f"C{m}", label=f"{mode}{final}")
    times.set_ylabel("seconds")
    times.set_ylim(top=times.get_ylim()[1] * 1.35)  # room for the legend
    times.legend(fontsize=7, ncol=len(results), loc="upper right")
    times.set_title(title, fontsize=10)
    rewards.set_ylabel("mean reward")
    rewards.set_xlabel("step")
    rewards.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mixed", choices=sorted(TASKS), help="one-word: one-word answers (replies shorten as "
                    "it learns); count: count to n (answers ~10-370 tokens); mixed: 3/4 one-word, 1/4 count")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="questions per step")
    ap.add_argument("--group", type=int, default=8, help="samples per problem (the GRPO group)")
    ap.add_argument("--max-new-tokens", type=int, default=1024,
                    help="the replies the policy cannot finish yet run to this limit, the long tail (on a 2-core CPU "
                         "rollouts are 56-69%% of plain-sync's step; 41-53%% at 512)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-layers", type=int, default=8, help="top decoder layers trained")
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--dual-clip", type=float, default=3.0, help="bound of the objective for negative advantages (x advantage)")
    ap.add_argument("--correction", default="decoupled", choices=["decoupled", "ppo"],
                    help="how the loss corrects stale samples (grpo_loss): decoupled PPO, or PPO's ratio to the behaviour policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local HF directory")
    ap.add_argument("--modes", default="plain-sync,adaptive-sync,adaptive-async",
                    help="SPECULATION[-sync|-async] runs to compare, each on a fresh fleet with the same seeds (no suffix: sync)")
    ap.add_argument("--eval-batches", type=int, default=2, help="batches of fresh prompts the final policy answers, "
                    "per mode (its reward is the comparison across modes); 0: none")
    ap.add_argument("--max-staleness", type=int, default=1, help="asynchronous modes: batches generating ahead of the trainer")
    ap.add_argument("--engine-cpus", default="auto",
                    help="CPUs for the engines, the trainer takes the rest ('auto': CPU 0 for the trainer, the others for "
                         "the engines, as separate GPUs would be; 'shared': no pinning; or a list like 1,2,3)")
    ap.add_argument("--engine-dtype", default="float32", choices=["float32", "auto", "bfloat16"],
                    help="the engines' precision; float32 matches the fp32 trainer's log-probs (auto: bf16 where the CPU has it)")
    ap.add_argument("--coupling", default="rejection", choices=["rejection", "race"],
                    help="the engines' speculative sampling; race: plain and speculative modes sample the same tokens "
                         "(the same batches and rewards; the comparison is then speed alone), for about a third of the tail's speed-up")
    ap.add_argument("--png", default="out/grpo_modes.png", help="the modes' step times and rewards per step, as a picture ('' for none)")
    ap.add_argument("--redis", help="use a running fleet instead (with --policy and --token); one run, no comparison")
    ap.add_argument("--policy")
    ap.add_argument("--token")
    a = ap.parse_args()
    modes = [m if m.endswith(("-sync", "-async")) else f"{m}-sync" for m in a.modes.split(",")]
    for m in modes:
        if m.rpartition("-")[0] not in MODES:
            ap.error(f"unknown mode {m!r}: SPECULATION[-sync|-async] with SPECULATION one of {', '.join(MODES)}")
    engine_cpus = pin_cpus(a.engine_cpus)

    results: dict[str, tuple[list[dict], dict | None]] = {}
    if a.redis:
        results["fleet"] = anyio.run(run, a, a.redis, a.policy, a.token, Fleet(redis_url=a.redis), modes[0].endswith("-async"))
    else:
        for mode in modes:
            speculation, _, sync = mode.rpartition("-")
            print(f"\n== {mode}: starting a fleet ==", flush=True)
            engine_args = ["--model", a.model, "--speculation", speculation, "--max-seq-len", str(a.max_new_tokens + 192),
                           "--dtype", a.engine_dtype, "--coupling", a.coupling]
            with Fleet(1, engine_args=engine_args, engine_cpus=engine_cpus) as fleet:
                results[mode] = anyio.run(run, a, fleet.redis_url, fleet.policy_url, fleet.token, fleet, sync == "async")
    for mode, (rows, evaluation) in results.items():
        print_table(mode, rows, evaluation)

    summary = {"example": "grpo", "task": a.task, "steps": a.steps, "prompts": a.prompts, "group": a.group, "model": a.model,
               "max_new_tokens": a.max_new_tokens, "engine_dtype": a.engine_dtype, "coupling": a.coupling, "max_staleness": a.max_staleness,
               "correction": a.correction,
               "engine_cpus": sorted(engine_cpus) if engine_cpus else "shared",
               "trainer_cpus": sorted(os.sched_getaffinity(0))}
    for mode, (rows, evaluation) in results.items():
        step_s = sum(r["step_s"] for r in rows)
        summary[mode] = {
            "reward_first": rows[0]["mean_reward"], "reward_last": rows[-1]["mean_reward"],
            "final_reward": evaluation and evaluation["eval_reward"], "final_reward_se": evaluation and evaluation["eval_reward_se"],
            "final_sample_versions": evaluation and evaluation["eval_sample_versions"],
            "rewards": [r["mean_reward"] for r in rows],
            "rollout_s": round(sum(r["rollout_s"] for r in rows), 2), "train_s": round(sum(r["train_s"] for r in rows), 2),
            "sync_s": round(sum(r["sync_s"] for r in rows), 2), "publish_s": round(sum(r["publish_s"] for r in rows), 2),
            "step_s": round(step_s, 2),
            "rollout_share": round(sum(r["rollout_s"] for r in rows) / step_s, 3),
            "staleness_max": max(r["staleness_max"] for r in rows),
            "dropped_groups": sum(r["dropped_groups"] for r in rows),
            "logprob_gap_mean": max((r["logprob_gap_mean"] or 0.0) for r in rows),
            "logprob_gap_max": max((r["logprob_gap_max"] or 0.0) for r in rows),
            # samples from another version than the batch asked for (sync: must be none)
            "stale_samples": sum(1 for r in rows for v in r["sample_versions"] if v != r["expected_version"]),
        }
    base = next((m for m in ("plain-sync", "plain") if m in summary), None)
    if base is not None:
        def change(ratio: float) -> str:
            return f"×{ratio} ({abs(100 * (1 - ratio)):.1f}% {'lower' if ratio <= 1 else 'higher'})"

        for mode in results:
            if mode != base:
                p, s = summary[base], summary[mode]
                s["rollout_time_ratio"] = round(s["rollout_s"] / p["rollout_s"], 3)
                s["step_time_ratio"] = round(s["step_s"] / p["step_s"], 3)
                print(f"{mode} vs {base}: rollout time {change(s['rollout_time_ratio'])}, step time {change(s['step_time_ratio'])}")
        print("(the paper reports 19.6% lower rollout time and 12.7% lower step time)")
    if a.png:
        ratios = ", ".join(f"{m} ×{summary[m]['step_time_ratio']}" for m in results if "step_time_ratio" in summary[m])
        os.makedirs(os.path.dirname(a.png) or ".", exist_ok=True)
        plot_modes(results, a.png, f"GRPO, {a.task} task, seed {a.seed}, ≤ {a.max_new_tokens} tokens, {a.coupling} coupling"
                   + (f"\nstep time vs {base}: {ratios}" if ratios else ""))
        summary["png"] = a.png
        print(f"picture: {a.png}")
    print(json.dumps(summary))


def pin_cpus(spec: str) -> set[int] | None:
    """Pin this process (the trainer, and the Redis and policy server it starts) and return the
    engines' CPUs; None: no pinning."""
    mine = os.sched_getaffinity(0)
    if spec == "shared" or (spec == "auto" and len(mine) < 2):
        return None
    engines = set(sorted(mine)[1:]) if spec == "auto" else {int(c) for c in spec.split(",")}
    trainer = mine - engines
    if not trainer or not engines <= mine:
        raise SystemExit(f"--engine-cpus {spec}: needs CPUs of {sorted(mine)} and at least one left for the trainer")
    os.sched_setaffinity(0, trainer)
    torch.set_num_threads(len(trainer))
    return engines


if __name__ == "__main__":
    main()
