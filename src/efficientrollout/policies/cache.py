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
from pathlib import Path

import msgspec

from .client import PolicyClient
from .store import WEIGHTS_FILE

_VERSION = re.compile(r"v(\d+)(?:\.json|\.model\.safetensors)?")


def default_cache_root(policy_url: str, base: str | os.PathLike | None = None) -> Path:
    """`<base>/<hash of the server's URL>`; base defaults to `<tmp>/efficientrollout-weights-<uid>`."""
    base = Path(base) if base else Path(tempfile.gettempdir()) / f"efficientrollout-weights-{os.getuid()}"
    return base / hashlib.sha256(policy_url.rstrip("/").encode()).hexdigest()[:16]


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.getuid() or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise PermissionError(f"{path}: a weight cache needs directories only this user can change "
                              f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)})")


class WeightCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        while True:  # join; a last member may be removing the directory right now: then start over
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                for d in (self.root.parent, self.root):  # loaded without a second sha256: nobody else may write here
                    _check_private(d)
                self._members = open(self.root / "members", "a")  # noqa: SIM115 - held for the cache's lifetime
            except FileNotFoundError:
                continue
            fcntl.flock(self._members, fcntl.LOCK_SH)
            try:
                if os.stat(self.root / "members").st_ino == os.fstat(self._members.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self._members.close()

    def fetch(self, client: PolicyClient, version: int) -> tuple[Path, bool]:
        """The version's verified weights (a file, or a directory of shards) and whether this
        call downloaded them (False: another engine on this host had)."""
        manifest = client.manifest(version)
        stamp = msgspec.json.encode(manifest)
        marker = self.root / f"v{version}.json"
        with open(self.root / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self._path(version, [f.name for f in manifest.files])
            if marker.exists() and marker.read_bytes() == stamp and path.exists():
                return path, False
            if marker.exists():  # other weights under the same number: not these
                self._remove(version)
            path = client.download(version, self.root, manifest)
            tmp = marker.with_suffix(".json.tmp")
            tmp.write_bytes(stamp)
            os.replace(tmp, marker)
            self._prune()
            return path, True

    def close(self) -> None:
        """Leave; the last engine to leave removes the directory and every version in it."""
        if self._members.closed:
            return
        fcntl.flock(self._members, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._members, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # others still use it
        else:  # nobody else holds it, and a newcomer blocked on it will see the file is gone
            shutil.rmtree(self.root, ignore_errors=True)
        self._members.close()

    def _path(self, version: int, names: list[str]) -> Path:
        return self.root / (f"v{version}.{WEIGHTS_FILE}" if names == [WEIGHTS_FILE] else f"v{version}")

    def _versions(self) -> tuple[set[int], set[int]]:
        """(complete, present in any form) version numbers."""
        complete, present = set(), set()
        for p in self.root.iterdir():
            if m := _VERSION.fullmatch(p.name):
                (complete if p.name.endswith(".json") else present).add(int(m.group(1)))
        return complete, present | complete

    def _prune(self) -> None:
        complete, present = self._versions()
        oldest_kept = sorted(complete)[-2:][0]  # and any partial download older than that goes too
        for v in present:
            if v < oldest_kept:
                self._remove(v)

    def _remove(self, version: int) -> None:
        (self.root / f"v{version}.json").unlink(missing_ok=True)  # first: a half-removed version is incomplete
        (self.root / f"v{version}.{WEIGHTS_FILE}").unlink(missing_ok=True)
        shutil.rmtree(self.root / f"v{version}", ignore_errors=True)
