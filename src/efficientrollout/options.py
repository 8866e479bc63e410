"""Config structs that describe themselves, and their one-to-one view as command-line flags.

Every field of a config struct (EngineConfig, SpeculationConfig, WorkerConfig) is a flag of the
same name (`max_batch_size` → `--max-batch-size`) with the struct's own default, so nothing a
struct can do is unreachable from the CLI and the two can never disagree. A field declares its
help (and, where useful, choices, an environment variable or another flag name) with `option`.
A field whose type is itself a config struct is flattened into the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
           env: str | None = None, flag: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its CLI description (`env`: the flag's default comes from this
    environment variable when set; `flag`: a flag name other than the field's)."""
    metadata = {"help": help, "choices": choices, "env": env, "flag": flag}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_arguments(parser, kind)
            continue
        optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
        if optional:
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        env = f.metadata.get("env")
        if env and os.environ.get(env):
            default = os.environ[env]
        help_text = f.metadata.get("help", "") + (f" (env {env})" if env else "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text + " [default: %(default)s]"}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and default is None
        if kind is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(_flag(f), nargs="+", type=item, default=default, **kwargs)
        else:
            parser.add_argument(_flag(f), type=kind, default=default, choices=f.metadata.get("choices"),
                                required=required, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """The struct whose fields are the parsed flags (nested structs built the same way)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_arguments(kind, args)
        else:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
