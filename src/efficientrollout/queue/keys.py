"""Every Redis key a fleet uses, in one place, derived from the fleet's prefix (`er` by
default; several fleets share one Redis under different prefixes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "er"
    group: str = "engines"  # the consumer group every engine joins on `requests`

    @property
    def requests(self) -> str:  # stream of RolloutRequests
        return f"{self.prefix}:requests"

    @property
    def results(self) -> str:  # stream of RolloutResults (capped)
        return f"{self.prefix}:results"

    @property
    def dead(self) -> str:  # stream of dead-lettered request entries
        return f"{self.prefix}:dead"

    @property
    def done(self) -> str:  # sorted set deduplicating results per (queue entry, sample)
        return f"{self.prefix}:done"

    @property
    def trace(self) -> str:  # stream of WaveTraces (capped)
        return f"{self.prefix}:trace"

    @property
    def policy_latest(self) -> str:  # the newest published policy version
        return f"{self.prefix}:policy:latest"

    @property
    def policy_channel(self) -> str:  # pub/sub: each new version as it is published
        return f"{self.prefix}:policy"

    def engine(self, engine_id: str) -> str:  # an engine's heartbeat (EngineStatus JSON, expires)
        return f"{self.prefix}:engines:{engine_id}"

    @property
    def engines_pattern(self) -> str:
        return self.engine("*")
