"""A host's weight downloads, shared by the engines on it.

A node running several engines (one per GPU, or per core group) would otherwise download and
sha256 every version once per engine: the policy server sends the same bytes N times and each
engine hashes them again (for SmolLM2 in fp32, 538 MB and ~0.5 s of sha256 per copy). With a
cache, the first engine that wants a version downloads and verifies it while the others wait
on a lock, then every engine loads the same verified files.

Layout under `root` (one directory per policy server, mode 0700):
  lock                     held exclusively while a version is looked up or downloaded
  members                  every engine using the cache holds a shared lock on it; the last to
                           leave (the one that gets it exclusively) removes the whole directory
  v<N>.json                the manifest v<N> was verified against: present only when complete
  v<N>.model.safetensors   or v<N>/ with shards: the weights, as `PolicyClient.download` lays them
A version counts only with its manifest next to it and equal to the server's (a server restarted
on an empty store may number other weights v<N> again). A cut download is resumed by the next
engine. The two newest complete versions are kept (an engine may still be loading the older);
older ones go as soon as a newer one is complete. Files here are loaded without hashing them
again, so the directory and its parent must be writable by this user alone (a sticky parent,
as /tmp, is fine).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from ..protocol import WeightManifest
from .client import FetchStopped, PolicyClient, download_path
from .store import WEIGHTS_FILE

_VERSION = re.compile(rf"v(\d+)(?:\.json|\.{re.escape(WEIGHTS_FILE)})?")


SHM = Path("/dev/shm")


def _server_key(policy_url: str) -> str:
    return hashlib.sha256(policy_url.rstrip("/").encode()).hexdigest()[:16]


def cache_roots(policy_url: str) -> list[Path]:
    """Where `default_cache_root` may put this server's versions without a base: in memory
    (/dev/shm), else in <tmp>."""
    name, key = f"efficientrollout-weights-{os.getuid()}", _server_key(policy_url)
    return [SHM / name / key, Path(tempfile.gettempdir()) / name / key]


def default_cache_root(policy_url: str, base: str | os.PathLike | None = None, version_bytes: int = 0) -> Path:
    """`<base>/<hash of the server's URL>`. Without a base: in /dev/shm where it has room for
    three versions of `version_bytes` (two kept, one arriving), or for one where engines on
    this host already keep this server's versions there; else `<tmp>/efficientrollout-weights-<uid>/...`.
    Ten 538 MB downloads right after a publish took 0.80 s on average into memory, 1.21 s onto
    an ext4 /tmp still writing back the versions before (2-core Xeon VM)."""
    if base:
        return Path(base) / _server_key(policy_url)
    shm, tmp = cache_roots(policy_url)
    if version_bytes > 0 and _room(SHM) >= (1 if shm.is_dir() else 3) * version_bytes:
        return shm
    return tmp


def _room(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm here
        return 0
    return st.f_bavail * st.f_frsize if os.access(path, os.W_OK | os.X_OK) else 0


def _check_private(path: Path, parent: bool = False) -> None:
    """`path` is ours and nobody else can write in it. A parent may also be root's, and shared
    if sticky (as /tmp): whoever owns a directory, or may write in one that is not sticky, can
    rename the cache away and put another in its place."""
    st = path.stat()
    owners = (os.getuid(), 0) if parent else (os.getuid(),)
    shared = st.st_mode & 0o022 and not (parent and st.st_mode & stat.S_ISVTX)
    if st.st_uid not in owners or shared:
        raise PermissionError(f"{path}: a weight cache needs a directory only this user can change "
                              f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)})")


def _lock(lock, stopping: Callable[[], bool] | None, version: int) -> None:
    """An exclusive lock on the open file `lock`, given up (FetchStopped) once `stopping()`."""
    if stopping is None:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if stopping():
                raise FetchStopped(f"stopped while another engine on this host fetched version {version}") from None
            time.sleep(0.02)


class WeightCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._join()

    def _join(self) -> None:
        while True:  # a last member may be removing the directory right now: then start over
            self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # 0700 whatever the umask
            self.root.mkdir(exist_ok=True, mode=0o700)
            try:  # files here are loaded without a second sha256: nobody else may write here
                _check_private(self.root.parent, parent=True)
                _check_private(self.root)
                members = open(self.root / "members", "a")  # noqa: SIM115 - held for the cache's lifetime
            except FileNotFoundError:
                continue
            fcntl.flock(members, fcntl.LOCK_SH)
            try:
                if os.stat(self.root / "members").st_ino == os.fstat(members.fileno()).st_ino:
                    self._members = members
                    return
            except FileNotFoundError:
                pass
            members.close()

    def fetch(self, client: PolicyClient, version: int, stopping: Callable[[], bool] | None = None,
              manifest: WeightManifest | None = None) -> tuple[Path, bool]:
        """The version's verified weights (a file, or a directory of shards) and whether this
        call downloaded them (False: another engine on this host had); its manifest is fetched
        unless given, as `PolicyClient.download` takes it. While another engine
        holds the cache, `stopping()` is asked every 20 ms, and between 4 MiB chunks while this
        one downloads; True raises FetchStopped (an engine told to stop need not wait out a
        download: for a large policy, a minute). What arrived stays, and the next fetch resumes it."""
        if self._members.closed:
            raise RuntimeError("this weight cache was closed")
        manifest = manifest or client.manifest(version)
        stamp = msgspec.json.encode(manifest)
        if not (self.root / "members").exists():  # removed under us (a /tmp cleaner): join again
            self._members.close()
            self._join()
        names, marker = [f.name for f in manifest.files], self.root / f"v{version}.json"
        path = download_path(self.root, version, names)
        with open(self.root / "lock", "a") as lock:
            _lock(lock, stopping, version)
            if marker.exists() and marker.read_bytes() == stamp and path.exists():
                return path, False  # exactly these weights, complete
            # other weights under this number go; a cut download (no manifest yet) resumes
            self._remove(version, keep=() if marker.exists() else names)
            client.download(version, self.root, manifest, stopping)
            tmp = marker.with_suffix(".json.tmp")
            tmp.write_bytes(stamp)
            os.replace(tmp, marker)
            self._prune(version)
            return path, True

    def holds(self, version: int) -> bool:
        """Whether some complete weights are here as `version` (not removed meanwhile)."""
        return (self.root / f"v{version}.json").exists()

    def close(self) -> None:
        """Leave; the last engine to leave removes the directory and every version in it."""
        if self._members.closed:
            return
        fcntl.flock(self._members, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._members, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # others still use it
        else:  # nobody else is in; moved aside in one step, so a newcomer starts a new directory
            gone = self.root.with_name(f".{self.root.name}.gone-{os.getpid()}-{id(self)}")
            try:
                os.rename(self.root, gone)
            except OSError:
                pass
            else:
                shutil.rmtree(gone, ignore_errors=True)
        self._members.close()

    def _prune(self, just: int) -> None:
        """Keep `just` and the complete version completed before it; anything else goes."""
        complete, present = {}, set()
        for p in self.root.iterdir():
            if m := _VERSION.fullmatch(p.name):
                present.add(v := int(m.group(1)))
                if p.suffix == ".json":
                    complete[v] = p.stat().st_mtime
        previous = sorted((t, v) for v, t in complete.items() if v != just)[-1:]  # by completion, not number
        for v in present - {just, *(v for _, v in previous)}:
            self._remove(v)

    def _remove(self, version: int, keep: list[str] = ()) -> None:
        """The version's files; with `keep`, the files a download of those names may resume."""
        (self.root / f"v{version}.json").unlink(missing_ok=True)  # first: a half-removed version is incomplete
        single, folder = self.root / f"v{version}.{WEIGHTS_FILE}", self.root / f"v{version}"
        if list(keep) == [WEIGHTS_FILE]:
            shutil.rmtree(folder, ignore_errors=True)
        elif keep:
            single.unlink(missing_ok=True)
            for f in folder.iterdir() if folder.is_dir() else ():
                if f.name not in keep:  # a cut download's shards of other weights would load with these
                    f.unlink()
        else:
            single.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
