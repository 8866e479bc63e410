"""Per-step record of what the engine did: the raw material of benchmarks and timeline plots."""

from __future__ import annotations

import msgspec


class StepRecord(msgspec.Struct, array_like=True):
    t: float  # seconds since the wave started
    batch: int  # running rows
    k: int  # draft length (0 = plain step)
    drafted: int  # draft tokens proposed this step (batch * k)
    accepted: int  # of which accepted
    emitted: int  # tokens emitted this step
    seconds: float  # wall time of the step
