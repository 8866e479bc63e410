"""One SGLang server process, owned by one engine process.

Started as `python -m sglang.launch_server` in its own process group (so that stopping it
stops its scheduler and detokenizer children too), on a free loopback port, and health-checked
before use. `ensure()` restarts it if it died; `stop()` asks politely, then kills the whole
group (SGLang ignores SIGTERM while requests are in flight) and removes the shared-memory
files its processes left in /dev/shm. The interpreter is configurable: SGLang may live in
another environment than ours (it pins its own torch), and we only talk to it over HTTP.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from ...queue.server import free_port

log = logging.getLogger("efficientrollout.engine")


class SGLangServerError(RuntimeError):
    """The SGLang server did not start, or is not answering."""


class SGLangServer:
    def __init__(self, python: str, server_args: list[str], env: dict[str, str], log_path: Path, startup_timeout_s: float):
        self.python, self.server_args, self.env = python, server_args, env
        self.log_path, self.startup_timeout_s = log_path, startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.restarts = -1  # the first start is not a restart

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def ensure(self) -> None:
        """A running, healthy server: start one, or replace one that died or stopped answering."""
        if self.alive():
            return
        if self.process is not None:
            log.warning("the SGLang server (pid %d) is gone or not answering; restarting it", self.process.pid)
            self.stop()
        self.start()

    def start(self) -> None:
        self.port = free_port()
        args = [self.python, "-m", "sglang.launch_server", *self.server_args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        self._shm_before = _shm_files()
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                        start_new_session=True)
        self.restarts += 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise SGLangServerError(f"the SGLang server exited during start-up (exit {self.process.returncode}); "
                                        f"see {self.log_path}: {_tail(self.log_path)}")
            if self.alive():
                log.info("SGLang server up on %s in %.1fs (pid %d)", self.url, time.monotonic() - t0, self.process.pid)
                return
            time.sleep(0.5)
        self.stop()
        raise SGLangServerError(f"the SGLang server did not answer within {self.startup_timeout_s:.0f}s; see {self.log_path}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # its children too, whatever the parent did
        self.process.wait()
        in_use = _open_files()  # another process's segment created meanwhile is not ours to remove
        for leftover in _shm_files() - self._shm_before - in_use:
            leftover.unlink(missing_ok=True)
        self.process = None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _shm_files() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.iterdir()) if shm.is_dir() else set()


def _open_files() -> set[Path]:
    """Files any live process holds open or mapped (read from /proc)."""
    held: set[Path] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            held.update(Path(os.readlink(fd)) for fd in (proc / "fd").iterdir())
            held.update(Path(line.split(maxsplit=5)[5]) for line in (proc / "maps").read_text().splitlines()
                        if line.count(" ") >= 5 and "/dev/shm/" in line)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return held


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
