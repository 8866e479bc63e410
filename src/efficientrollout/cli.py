"""`efficientrollout` command line.

    demo            the whole pipeline on this machine (fleet, producer, trainer stand-in), summary + timeline
    generate        completions for prompts given on the command line (engine in this process)
    engine          a long-running engine worker: --redis URL [--policy URL]
    policy-server   the versioned weight store over HTTP
    fleet           Redis (embedded unless --redis), the policy server and N engines, with a status view
    status          one status view of a running fleet (engines' heartbeats and the queue)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from .engines.native import EngineConfig, NativeEngine
from .options import add_arguments, from_arguments
from .pipeline.demo import add_demo_args, run_demo
from .protocol import ChatMessage, RolloutRequest, SamplingParams

BACKENDS = ("native", "sglang")


def _engine_args(p: argparse.ArgumentParser) -> None:
    """EngineConfig and its SpeculationConfig, field for field."""
    add_arguments(p.add_argument_group("engine (EngineConfig, SpeculationConfig)"), EngineConfig)


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)


def _engine(a: argparse.Namespace, engine_id: str | None = None):
    """The backend asked for (`--backend`; `generate` is always native), from its config structs."""
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if getattr(a, "backend", "native") == "sglang":
        from .engines.sglang import SGLangConfig, SGLangEngine

        engine = SGLangEngine(from_arguments(EngineConfig, a), from_arguments(SGLangConfig, a), engine_id=engine_id)
    else:
        engine = NativeEngine(from_arguments(EngineConfig, a), engine_id=engine_id)
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
        print(f"speculation ({engine.config.speculation.mode}, {engine.drafter.kernel} self-drafter): "
              f"{len(spec)}/{len(trace)} steps speculated, mean K {sum(s.k for s in spec) / len(spec):.1f}, "
              f"acceptance {sum(s.accepted for s in trace) / drafted:.2f}")


def _serve_engine(a: argparse.Namespace) -> None:
    import anyio

    from .pipeline.service import EngineService, WorkerConfig

    from .engines.thread import engine_thread

    config = from_arguments(WorkerConfig, a)  # before loading the model: a bad flag fails fast
    engine = engine_thread().call(_engine, a, a.engine_id)  # all tensor work on one thread (engines/thread.py)
    try:
        anyio.run(EngineService(engine, config).run)
    finally:
        engine.close()


def _serve_policies(a: argparse.Namespace) -> None:
    import uvicorn

    from .policies.server import create_app
    from .policies.store import PolicyStore

    token = a.token or os.environ.get("EFFICIENTROLLOUT_POLICY_TOKEN")
    if not token:
        sys.exit("policy-server needs a publish token: --token or EFFICIENTROLLOUT_POLICY_TOKEN")
    app = create_app(PolicyStore(a.store, keep=a.keep), token, redis_url=a.redis, prefix=a.prefix, read_token=a.read_token)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


def _run_fleet(a: argparse.Namespace, engine_args: list[str]) -> None:
    from .pipeline.fleet import Fleet, format_status

    fleet = Fleet(a.engines, redis_url=a.redis, workdir=a.workdir, prefix=a.prefix, policy_port=a.policy_port,
                  token=os.environ.get("EFFICIENTROLLOUT_POLICY_TOKEN"), read_token=os.environ.get("EFFICIENTROLLOUT_POLICY_READ_TOKEN"),
                  engine_args=engine_args)
    print(f"starting: {a.engines} engine(s); logs in {fleet.workdir / 'logs'}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop drains the fleet like Ctrl-C does
    failed = False
    try:
        fleet.start()
        print(f"redis   {fleet.redis_url}\npolicy  {fleet.policy_url}  (publish token: {fleet.token}; read token: {fleet.read_token})\n"
              f"stop with Ctrl-C (engines finish their wave)\n", flush=True)
        while True:
            print(format_status(fleet.status()) + "\n", flush=True)
            time.sleep(a.interval)
    except KeyboardInterrupt:
        pass
    except BaseException:
        failed = True
        raise
    finally:
        print("stopping the fleet", file=sys.stderr)
        fleet.stop(failed=failed)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _show_status(a: argparse.Namespace) -> None:
    from .pipeline.fleet import Fleet, format_status

    print(format_status(Fleet(redis_url=a.redis, prefix=a.prefix).status()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficientrollout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on this machine with the bundled model")
    add_demo_args(demo)
    gen = sub.add_parser("generate", help="generate completions for prompts given on the command line")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    _engine_args(gen)
    _sampling_args(gen, max_new_tokens=128)

    from .pipeline.service import WorkerConfig

    eng = sub.add_parser("engine", help="run an engine worker: claim waves from Redis, follow the policy server")
    eng.add_argument("--backend", default="native", choices=BACKENDS, help="the engine that generates [default: %(default)s]")
    eng.add_argument("--engine-id", default=None, help="name in results, logs and metrics (default: native-<host>-<pid>)")
    eng.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_arguments(eng.add_argument_group("worker (WorkerConfig)"), WorkerConfig)
    _engine_args(eng)
    from .engines.sglang.config import SGLangConfig

    add_arguments(eng.add_argument_group("SGLang backend (SGLangConfig; with --backend sglang)"), SGLangConfig)

    pol = sub.add_parser("policy-server", help="serve versioned policy weights over HTTP")
    pol.add_argument("--store", required=True, help="directory of the versions")
    pol.add_argument("--host", default="127.0.0.1")
    pol.add_argument("--port", type=int, default=8700)
    pol.add_argument("--keep", type=int, default=3, help="versions kept")
    pol.add_argument("--token", default=None, help="publish token (or EFFICIENTROLLOUT_POLICY_TOKEN); it also reads")
    pol.add_argument("--read-token", default=os.environ.get("EFFICIENTROLLOUT_POLICY_READ_TOKEN"),
                     help="a token that downloads weights but cannot publish (or EFFICIENTROLLOUT_POLICY_READ_TOKEN); "
                          "without one, only the publish token reads")
    pol.add_argument("--redis", default=None, help="announce new versions on this Redis")
    pol.add_argument("--prefix", default="er")

    fl = sub.add_parser("fleet", help="Redis, the policy server and N engines on this machine, with a status view",
                        epilog="arguments after -- go to every engine, e.g. -- --speculation plain")
    fl.add_argument("--engines", type=int, default=1)
    fl.add_argument("--redis", default=None, help="use this Redis instead of an embedded one")
    fl.add_argument("--workdir", default=None, help="logs, policy store and embedded Redis data (default: a temporary "
                    "directory, removed when the fleet stops)")
    fl.add_argument("--policy-port", type=int, default=8700)
    fl.add_argument("--prefix", default="er")
    fl.add_argument("--interval", type=float, default=5.0, help="seconds between status views")

    st = sub.add_parser("status", help="engines and queue of a running fleet")
    st.add_argument("--redis", default=os.environ.get("EFFICIENTROLLOUT_REDIS"), required="EFFICIENTROLLOUT_REDIS" not in os.environ)
    st.add_argument("--prefix", default="er")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    engine_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if a.command == "demo":
        run_demo(a)
    elif a.command == "generate":
        _run(_engine(a), a.prompts, a, chat=not a.raw)
    elif a.command == "engine":
        _serve_engine(a)
    elif a.command == "policy-server":
        _serve_policies(a)
    elif a.command == "fleet":
        _run_fleet(a, engine_args)
    else:
        _show_status(a)


if __name__ == "__main__":
    main()
