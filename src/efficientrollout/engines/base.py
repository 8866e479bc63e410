"""What the fleet needs from an engine, whatever backend runs it.

A worker knows engines only through this protocol: it streams a wave, stops it early, loads
new weights between waves and reads the last wave's step trace. `backend` and `dtype` say what
computed the log-probs of every result (they are copied into each `RolloutResult`), so a
trainer can tell an fp32 engine, whose log-probs match its own fp32 recomputation to ~1e-5,
from a bf16 one (~0.045 nats apart on average for SmolLM2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import torch

from ..protocol import RolloutRequest, RolloutResult, StepRecord, error_result


class EngineUnusable(RuntimeError):
    """The engine cannot serve any more waves (e.g. its CUDA context is broken): the worker
    releases its wave for other engines and the process exits."""


class Engine(Protocol):
    engine_id: str
    version: int  # the policy version every result of the next wave will carry
    backend: str  # "native", "sglang"
    dtype: str  # the precision the log-probs are computed in: "float32", "bfloat16", ...
    trace: list[StepRecord]  # the last wave's steps

    def stream(self, requests: Iterable[RolloutRequest], stop: Callable[[], bool] | None = None) -> Iterator[RolloutResult]:
        """Generate a wave, yielding each sample's result as soon as it finishes. A failure of
        one request (its encoding, its sampling parameters) is that request's error result;
        `stop()` turning true ends the wave after the current step."""
        ...

    def abort(self) -> None:
        """End the wave now being generated after its current step (no effect between waves)."""
        ...

    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike, version: int) -> float:
        """Load new weights between waves (old ones keep serving if they do not fit)."""
        ...

    def settle(self) -> None:
        """Finish, while idle, what update_weights deferred (the drafter's re-quantization)."""
        ...

    def close(self) -> None:
        """Release what the engine owns beyond this process (a server it started)."""
        ...


def engine_error(engine: Engine, request: RolloutRequest, index: int, error: str) -> RolloutResult:
    """Sample `index` of `request` could not be served by `engine`."""
    return error_result(request.id, index, error, engine.version, request.metadata, engine.engine_id, engine.backend, engine.dtype)


def in_request_order(results: Iterable[RolloutResult], requests: list[RolloutRequest]) -> list[RolloutResult]:
    """A wave's results ordered by request, then sample index (what `generate` returns)."""
    order = {r.id: i for i, r in enumerate(requests)}
    return sorted(results, key=lambda r: (order[r.request_id], r.sample_index))
