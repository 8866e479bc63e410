"""`efficientrollout` command line: demo and generate (the fleet commands join later)."""

from __future__ import annotations

import argparse
import sys
import time

from .engines.native import EngineConfig, NativeEngine
from .protocol import ChatMessage, RolloutRequest, SamplingParams
from .speculation import MODES, SpeculationConfig

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for learning to cook.",
    "What is 12 times 7?",
    "Name three planets of the solar system.",
    "Write a short poem about autumn leaves.",
    "How do I boil an egg?",
]


def _engine_args(p: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    p.add_argument("--model", default=defaults.model, help="'smollm2' (bundled) or a local HF model directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    p.add_argument("--speculation", default=defaults.speculation.mode, choices=MODES)
    p.add_argument("--k", type=int, default=defaults.speculation.k, help="draft length for --speculation always")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)


def _engine(a: argparse.Namespace) -> NativeEngine:
    cfg = EngineConfig(model=a.model, device=a.device, dtype=a.dtype, max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len,
                       speculation=SpeculationConfig(mode=a.speculation, k=a.k))
    t0 = time.perf_counter()
    engine = NativeEngine(cfg)
    print(f"loaded {engine.model_path} on {engine.device} ({engine.dtype}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return engine


def _run(engine: NativeEngine, prompts: list[str], a: argparse.Namespace, chat: bool) -> None:
    sampling = SamplingParams(
        n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens, seed=a.seed
    )
    requests = [
        RolloutRequest(id=str(i), sampling=sampling, **({"messages": [ChatMessage("user", p)]} if chat else {"prompt": p}))
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - t0
    for r in results:
        print(f"\n[{r.request_id}.{r.sample_index}] {prompts[int(r.request_id)]}")
        print(f"  → {r.text.strip()}")
        print(f"  ({len(r.output_token_ids)} tokens, finish={r.finish_reason}, version={r.policy_version})")
    tokens = sum(len(r.output_token_ids) for r in results)
    print(f"\n{len(results)} completions, {tokens} tokens in {elapsed:.1f}s: {tokens / elapsed:.1f} tokens/s "
          f"(batch of {len(results)} on {engine.device}, {engine.dtype})")
    trace = engine.trace
    drafted = sum(s.drafted for s in trace)
    if drafted:
        spec = [s for s in trace if s.k > 0]
        print(f"speculation ({engine.config.speculation.mode}, {engine.drafter.kernel} int8 self-drafter): "
              f"{len(spec)}/{len(trace)} steps speculated, mean K {sum(s.k for s in spec) / len(spec):.1f}, "
              f"acceptance {sum(s.accepted for s in trace) / drafted:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="efficientrollout")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate completions for built-in prompts with the bundled model")
    _engine_args(demo)
    _sampling_args(demo, max_new_tokens=64)
    gen = sub.add_parser("generate", help="generate completions for prompts given on the command line")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    _engine_args(gen)
    _sampling_args(gen, max_new_tokens=128)
    a = parser.parse_args(argv)
    engine = _engine(a)
    if a.command == "demo":
        _run(engine, DEMO_PROMPTS, a, chat=True)
    else:
        _run(engine, a.prompts, a, chat=not a.raw)


if __name__ == "__main__":
    main()
