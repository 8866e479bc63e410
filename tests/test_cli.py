"""The command line is a one-to-one view of the config structs: every field of EngineConfig,
SpeculationConfig and WorkerConfig has a flag, the flags' defaults are the structs' defaults,
and a non-default value given on the command line reaches the struct."""

from __future__ import annotations

import dataclasses

from efficientrollout.cli import build_parser
from efficientrollout.engines.native import EngineConfig
from efficientrollout.engines.sglang import SGLangConfig
from efficientrollout.options import from_arguments
from efficientrollout.pipeline.service import WorkerConfig
from efficientrollout.speculation import SpeculationConfig


def _dests(parser) -> set[str]:
    engine = parser._subparsers._group_actions[0].choices["engine"]  # argparse keeps subparsers here
    return {action.dest for action in engine._actions}


def test_every_config_field_is_a_flag_with_the_structs_default():
    parser = build_parser()
    fields = {f.name for cls in (EngineConfig, SpeculationConfig, WorkerConfig, SGLangConfig) for f in dataclasses.fields(cls)}
    fields -= {"speculation"}
    assert fields <= _dests(parser), fields - _dests(parser)
    assert from_arguments(EngineConfig, parser.parse_args(["generate", "hello"])) == EngineConfig()
    a = parser.parse_args(["engine", "--redis", "redis://h:1/0"])
    assert from_arguments(EngineConfig, a) == EngineConfig()
    assert from_arguments(WorkerConfig, a) == WorkerConfig(redis_url="redis://h:1/0")


def test_flags_reach_the_structs():
    a = build_parser().parse_args([
        "engine", "--redis", "redis://h:1/0", "--policy", "http://p:8700", "--read-token", "r", "--drain-timeout-s", "5",
        "--metrics-port", "0", "--dtype", "float32", "--max-prefill-tokens", "512", "--speculation", "toggle-ladder",
        "--k-max", "6", "--drafter", "exact", "--no-probe", "--ladder", "3", "5", "--toggle-speedup", "1.2"])
    worker, engine = from_arguments(WorkerConfig, a), from_arguments(EngineConfig, a)
    assert (worker.policy_url, worker.read_token, worker.drain_timeout_s, worker.metrics_port) == ("http://p:8700", "r", 5.0, 0)
    assert (engine.dtype, engine.max_prefill_tokens) == ("float32", 512)
    spec = engine.speculation
    assert (spec.mode, spec.k_max, spec.drafter, spec.probe, spec.ladder, spec.toggle_speedup) == (
        "toggle-ladder", 6, "exact", False, (3, 5), 1.2)
