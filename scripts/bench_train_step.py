"""Time the GRPO example's update (`grpo_loss`, gradient clip, AdamW on the top layers) on
batches shaped like its steps, on one thread as the example's trainer runs (pinned to one CPU):
`short` (64 samples: 48 one-word replies, 16 of 8-57 tokens, ~600 tokens) and `long` (48 one-word,
two 1024-token replies and 14 of 10-300 tokens, ~3,700). The prompts are the chat template
around a one-word question (45 tokens with SmolLM2's), 8 samples each; tokens and advantages are
random, which does not change the work. `--against OLD.py` times another version of
examples/grpo.py in the same run, interleaved (`git show REV:examples/grpo.py > /tmp/old.py`).
Median of --repeats after one warm-up; JSON line last.

    python scripts/bench_train_step.py --against /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import torch

from efficientrollout.models.checkpoint import resolve_model
from efficientrollout.protocol import RolloutResult

SHAPES = {"short": [5] * 48 + [57, 40, 30, 20, 10, 12, 8, 20, 15, 11, 9, 30, 25, 14, 50, 13],
          "long": [8] * 48 + [1024, 1024, 300, 200, 150, 120, 100, 90, 80, 60, 50, 40, 30, 20, 15, 10]}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(tokenizer, vocab: int, lengths: list[int], group: int, rng: random.Random) -> tuple[list[RolloutResult], list[float]]:
    samples = []
    for i, n in enumerate(lengths):
        p = i // group
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Question {p}: what color is the sky? Answer in one word."}],
                                             add_generation_prompt=True, tokenize=False)
        samples.append(RolloutResult(request_id=f"p{p}", sample_index=i % group, policy_version=0, prompt_token_ids=tokenizer(text)["input_ids"],
                                     output_token_ids=[rng.randrange(vocab) for _ in range(n)], text="", logprobs=[-2.0] * n,
                                     finish_reason="stop"))
    return samples, [rng.gauss(0.0, 1.0) for _ in samples]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local HF directory")
    ap.add_argument("--shapes", default="short,long", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--train-layers", type=int, default=8)
    ap.add_argument("--against", help="another examples/grpo.py to time beside this checkout's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="the example's trainer has one CPU")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    here = Path(__file__).resolve().parents[1] / "examples" / "grpo.py"
    variants = {"current": load(here, "grpo_current")}
    if a.against:
        variants["against"] = load(Path(a.against), "grpo_against")
    path = resolve_model(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    for layer in model.model.layers[-a.train_layers:]:
        layer.requires_grad_(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)

    def update(grpo, samples, advantages) -> float:
        with torch.no_grad():  # every update from the same weights
            for p, p0 in zip(trained, start):
                p.copy_(p0)
        t0 = time.perf_counter()
        model.train()
        optimizer.zero_grad()
        grpo.grpo_loss(model, samples, advantages, clip=0.2)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        return time.perf_counter() - t0

    rows = []
    for shape in a.shapes.split(","):
        samples, advantages = batch(tokenizer, model.config.vocab_size, SHAPES[shape], 8, random.Random(0))
        times = {name: [] for name in variants}
        for name, grpo in variants.items():
            update(grpo, samples, advantages)  # warm-up
        for _ in range(a.repeats):
            for name, grpo in variants.items():
                times[name].append(update(grpo, samples, advantages))
        row = {"shape": shape, "samples": len(samples), "tokens": sum(SHAPES[shape]),
               **{f"{name}_s": round(statistics.median(t), 3) for name, t in times.items()}}
        if a.against:
            row["current_vs_against"] = round(row["current_s"] / row["against_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "train_step", "model": a.model, "train_layers": a.train_layers, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
