"""The long-running engine process behind `efficientrollout engine`.

Between waves it asks the policy server for a newer version; if there is one it downloads
it (sha256-verified, resumable; once per host: the engines on one machine share a
`WeightCache`), loads it in place, reports it, and then re-quantizes the
drafter while idle (`Engine.settle`; a wave that starts first re-quantizes before its first
draft). Any failure there keeps the old version serving and is logged (and counted in the
metrics). Then it claims a wave and serves it (WaveWorker). The lifecycle is the one RL
frameworks use: pause (between waves) → load → resume; every result names the version that
made it.

Operations: a heartbeat hash `<prefix>:engines:<id>` (expires when the process dies) feeds
`efficientrollout status`; each wave's step trace goes to `<prefix>:trace` (capped) for
timeline plots; `/metrics` (Prometheus text) and `/healthz` on an optional port. SIGTERM or
SIGINT: stop claiming, finish the current wave within `drain_timeout_s`, else stop it and
release its unfinished entries to other workers at once. A second signal skips the drain.
Losing Redis is survived: the worker logs, backs off and carries on when it is back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

import anyio
import anyio.to_thread
import msgspec

from ..engines import Engine, EngineUnusable
from ..engines.thread import engine_thread
from ..options import option
from ..policies import FetchStopped, PolicyClient, PolicyError, WeightCache, default_cache_root
from ..protocol import EngineStatus, WaveTrace
from ..queue import RolloutQueue
from .metrics import WorkerMetrics, serve_http
from .worker import REDIS_DOWN as _REDIS_DOWN
from .worker import WaveStats, WaveWorker, redis_down

log = logging.getLogger("efficientrollout.engine")


def _speculation_summary(trace: list) -> str:
    """How the wave's decode steps went, for the log: the share that speculated, their acceptance
    and mean K, and the seconds spent with at most 4 rows running (the tail, where it pays)."""
    steps = [s for s in trace if s.emitted]
    if not steps:
        return ""
    spec = [s for s in steps if s.k > 0]
    tail = sum(s.seconds for s in steps if s.batch <= 4)
    text = f"; {len(spec)}/{len(steps)} steps speculative"
    if spec:
        text += f" (acceptance {sum(s.accepted for s in spec) / max(1, sum(s.drafted for s in spec)):.2f}, " \
                f"mean K {sum(s.k for s in spec) / len(spec):.1f})"
    return text + f", {tail:.1f}s with <= 4 running"


@dataclass(slots=True)
class WorkerConfig:
    redis_url: str = option(help="redis://[user:password@]host:port/db (rediss:// for TLS)", env="EFFICIENTROLLOUT_REDIS",
                            flag="--redis")
    policy_url: str | None = option(None, "policy server URL (none: serve the engine's own weights, never update)",
                                    env="EFFICIENTROLLOUT_POLICY", flag="--policy")
    read_token: str | None = option(None, "the policy server's read token (or its publish token)",
                                    env="EFFICIENTROLLOUT_POLICY_READ_TOKEN")
    prefix: str = option("er", "key prefix shared by the fleet (several fleets can share one Redis)")
    wave_size: int = option(64, "requests claimed per wave (each brings its n samples)")
    lease_ms: int = option(30_000, "an entry not renewed for this long goes to another worker")
    max_deliveries: int = option(3, "deliveries before a request is dead-lettered with error results")
    policy_poll_s: float = option(0.5, "how often to ask the policy server for a new version between waves (one "
                                            "it announced on Redis is fetched within 0.1 s)")
    drain_timeout_s: float = option(30.0, "on SIGTERM: finish the wave if it ends within this, else release it")
    metrics_host: str = option("127.0.0.1", "address of /metrics and /healthz")
    metrics_port: int | None = option(None, "serve /metrics and /healthz on this port (0: any free port; none: off)")
    download_dir: str | None = option(None, "where weight downloads land, shared by the engines on this host that name "
                                            "the same one (none: /dev/shm where it has room for three versions, "
                                            "else <tmp>; under efficientrollout-weights-<uid>)")

    def __post_init__(self) -> None:
        if self.wave_size < 1 or self.lease_ms < 100 or self.max_deliveries < 1:
            raise ValueError("wave_size, max_deliveries must be >= 1 and lease_ms >= 100")


class EngineService:
    def __init__(self, engine: Engine, config: WorkerConfig):
        self.engine, self.config = engine, config
        self.queue = RolloutQueue(config.redis_url, prefix=config.prefix, lease_ms=config.lease_ms,
                                  max_deliveries=config.max_deliveries)
        self.policy = PolicyClient(config.policy_url, config.read_token) if config.policy_url else None
        self.metrics = WorkerMetrics(policy_version=engine.version)
        self.state = "starting"
        self.metrics_port: int | None = None
        self._bad_versions: set[int] = set()
        self._last_poll = 0.0
        self._announced_seen = -1  # the newest version announced on Redis that this engine looked for
        self._cache: WeightCache | None = None  # joined at the first new version, left when run() ends
        self.keys = self.queue.keys
        self._started = time.time()

    async def run(self) -> None:
        log.info("engine %s serving version %d from %s", self.engine.engine_id, self.engine.version, self.config.redis_url)
        try:
            await self._run()
        finally:
            if self._cache is not None:
                self._cache.close()
        log.info("engine %s stopped after %d waves", self.engine.engine_id, self.metrics.waves)

    async def _run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.worker = WaveWorker(self.engine, self.queue, self.engine.engine_id, self.config.wave_size)
            self._stopping = anyio.Event()
            tg.start_soon(self._watch_signals)
            if self.config.metrics_port is not None:
                self.metrics_port = await tg.start(serve_http, self.config.metrics_host, self.config.metrics_port, self._http)
                log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)
            tg.start_soon(self._heartbeat)
            await self._serve()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await self.queue.redis.delete(self.keys.engine(self.engine.engine_id))
            except _REDIS_DOWN:
                pass
            await self.queue.close()

    def stop(self, now: bool = False) -> None:
        """Stop claiming; with now=True also stop the current wave and release its entries."""
        self._stopping.set()
        if now:
            self.worker.stop.set()

    async def _serve(self) -> None:
        backoff = 0.1
        force_poll, connected = True, False
        while not self._stopping.is_set():
            try:
                if not connected:  # the group again after an outage: a Redis without AOF comes back empty
                    await self.queue.setup()
                    connected = True
                await self._sync_policy(force_poll or await self._announced())
                self.state = "idle"
                # with a policy server, an idle engine looks at its announcement every 100 ms
                stats = await self.worker.run_wave(block_ms=500 if self.policy is None else 100)
                backoff = 0.1
            except EngineUnusable as exc:
                log.critical("engine %s is unusable (%s); its wave was released, exiting", self.engine.engine_id, exc)
                raise
            except Exception as exc:
                if not redis_down(exc):
                    raise
                connected = False
                self.state = "redis-down"
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            force_poll = stats.deferred > 0  # someone wants a newer version: look now
            if stats.requests:
                await self._account(stats)
            if stats.deferred and not stats.results:
                await anyio.sleep(0.2)  # only too-new requests: let the trainer publish

    async def _account(self, stats: WaveStats) -> None:
        m = self.metrics
        m.waves += 1
        m.requests += stats.requests
        m.results += stats.results
        m.errors += stats.errors
        m.output_tokens += stats.tokens
        m.deferred += stats.deferred
        m.engine_failures += stats.engine_failures
        if stats.results:
            m.tokens_per_second = stats.tokens / max(stats.seconds, 1e-9)
        trace = list(self.engine.trace) if stats.results else []
        m.decode_steps += sum(1 for s in trace if s.emitted)
        m.speculative_steps += sum(1 for s in trace if s.k > 0)
        m.drafted_tokens += sum(s.drafted for s in trace)
        m.accepted_tokens += sum(s.accepted for s in trace)
        log.info("wave %d: %d requests, %d results (%d errors, %d deferred, %d released), %d tokens in %.1fs%s",
                 m.waves, stats.requests, stats.results, stats.errors, stats.deferred, stats.released, stats.tokens, stats.seconds,
                 _speculation_summary(trace))
        if trace:  # for timeline plots; best effort
            record = WaveTrace(engine=self.engine.engine_id, version=self.engine.version, end=time.time(), seconds=stats.seconds,
                               requests=stats.served, steps=trace)
            try:
                await self.queue.redis.xadd(self.keys.trace, {"data": msgspec.msgpack.encode(record)}, maxlen=10_000, approximate=True)
            except _REDIS_DOWN:
                pass

    async def _announced(self) -> bool:
        """Whether the policy server announced (on Redis) a version newer than the one served and
        not yet looked at: then the engine asks the server now rather than at its next poll."""
        if self.policy is None:
            return False
        raw = await self.queue.redis.get(self.keys.policy_latest)
        try:
            announced = int(raw) if raw is not None else -1
        except ValueError:
            return False
        if announced <= max(self.engine.version, self._announced_seen):
            return False
        self._announced_seen = announced
        return True

    async def _sync_policy(self, force: bool) -> None:
        if self.policy is None or (not force and time.monotonic() - self._last_poll < self.config.policy_poll_s):
            return
        self._last_poll = time.monotonic()
        try:
            latest = await anyio.to_thread.run_sync(self.policy.latest)
        except Exception as exc:  # noqa: BLE001 - an unreachable policy server must not stop serving
            log.warning("policy server unreachable (%s); still serving version %d", exc, self.engine.version)
            return
        if latest is None or latest <= self.engine.version or latest in self._bad_versions:
            return
        manifest = None
        if self._cache is None:  # joined once the size of a version is known: it decides where the cache goes
            try:
                manifest = await anyio.to_thread.run_sync(self.policy.manifest, latest)
            except Exception as exc:  # noqa: BLE001 - as an unreachable server above
                if isinstance(exc, PolicyError):  # refused: not asked again
                    self._bad_versions.add(latest)
                log.warning("policy version %d: no manifest (%s); still serving version %d", latest, exc, self.engine.version)
                return
            root = default_cache_root(self.policy.url, self.config.download_dir, sum(f.size for f in manifest.files))
            try:
                self._cache = await anyio.to_thread.run_sync(WeightCache, root)
            except OSError as exc:  # e.g. a directory others could write to: stop rather than load from it
                raise RuntimeError(f"cannot use {root} as this host's weight cache: {exc}") from exc
        self.state = "updating"
        t0 = time.perf_counter()
        fetched = None
        try:  # the first engine on this host downloads the version; the others wait for it and share it
            path, fetched = await anyio.to_thread.run_sync(self._cache.fetch, self.policy, latest, self._stopping.is_set, manifest)
            downloaded = time.perf_counter() - t0
            await engine_thread().run(self.engine.update_weights, path, latest)
        except FetchStopped:
            log.info("stopping: not fetching policy version %d", latest)
            return
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old weights serving
            self.metrics.weight_update_failures += 1
            # never retried: refused (4xx) or bad bytes, and weights that do not fit; asked again later:
            # an unreachable server, a disk problem, weights removed from the cache while loading
            if isinstance(exc, PolicyError) or (fetched is not None and self._cache.holds(latest)):
                self._bad_versions.add(latest)
            log.error("could not load policy version %d (%s: %s); still serving version %d",
                      latest, type(exc).__name__, exc, self.engine.version)
            return
        self.metrics.weight_updates += 1
        self.metrics.policy_version = self.engine.version
        self.metrics.last_weight_update_seconds = time.perf_counter() - t0
        await self._beat()  # tell `status` (and trainers waiting for the version) now, not at the next beat
        t0 = time.perf_counter()
        try:
            await engine_thread().run(self.engine.settle)  # deferred work (re-quantization) while idle
        finally:  # the new weights serve whatever settle did
            log.info("now serving policy version %d (%s %.2fs + load %.2fs; then settled in %.2fs)", latest,
                     "download" if fetched else "from this host's cache", downloaded,
                     self.metrics.last_weight_update_seconds - downloaded, time.perf_counter() - t0)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._stopping.is_set():
                    log.warning("second %s: stopping the wave now and releasing it", name)
                    self.stop(now=True)
                    continue
                log.info("%s: finishing the current wave (at most %.0fs), then exiting", name, self.config.drain_timeout_s)
                self.state = "draining"
                self.stop()
                self._tg.start_soon(self._drain_deadline)

    async def _drain_deadline(self) -> None:
        await anyio.sleep(self.config.drain_timeout_s)
        log.warning("drain timeout: stopping the wave and releasing its unfinished requests")
        self.worker.stop.set()

    def status(self) -> EngineStatus:
        m, e = self.metrics, self.engine
        return EngineStatus(
            engine=e.engine_id, backend=e.backend, dtype=e.dtype, host=socket.gethostname(), pid=os.getpid(), state=self.state,
            version=e.version, waves=m.waves, results=m.results, tokens=m.output_tokens,
            tokens_per_second=round(m.tokens_per_second, 1), acceptance=round(m.acceptance_rate, 3),
            speculated=round(m.speculated_fraction, 3), update_failures=m.weight_update_failures,
            metrics=f"http://{self._metrics_address()}:{self.metrics_port}/metrics" if self.metrics_port else None,
            uptime_s=round(time.time() - self._started, 1))

    def _metrics_address(self) -> str:
        host = self.config.metrics_host
        return socket.gethostname() if host in ("0.0.0.0", "::", "") else host

    async def _heartbeat(self) -> None:
        while True:
            await self._beat()
            await anyio.sleep(2)

    async def _beat(self) -> None:
        try:
            await self.queue.redis.set(self.keys.engine(self.engine.engine_id), msgspec.json.encode(self.status()), ex=10)
        except _REDIS_DOWN:
            pass

    async def _http(self, path: str) -> tuple[int, str, str]:
        if path == "/healthz":
            ok = self.state not in ("redis-down", "starting")
            return (200 if ok else 503), "application/json", msgspec.json.encode(self.status()).decode()
        if path == "/metrics":
            try:
                m = self.metrics
                m.queue_waiting, m.queue_pending, m.queue_lag_seconds = await self.queue.backlog()
            except _REDIS_DOWN:
                pass
            return 200, "text/plain; version=0.0.4", self.metrics.render({"engine": self.engine.engine_id})
        return 404, "text/plain", "not found\n"

