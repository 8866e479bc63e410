"""Trainer and engine sides of the policy server: publish weights, fetch and verify them."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from .store import (
    WEIGHTS_FILE,
    FileEntry,
    PolicyError,
    PolicyUnavailable,
    SafetensorsStream,
    WeightManifest,
    shard_name,
    sha256_file,
    sha256_of,
    split_shards,
)

SHARD_BYTES = 1 << 30  # a publish travels as safetensors shards of at most this many bytes


def _client(owner: object, headers: dict[str, str], timeout: float) -> httpx.Client:
    """One HTTP client for `owner`'s lifetime (each new one builds a TLS context: ~50 ms of CPU),
    shared by its threads, closed with it."""
    client = httpx.Client(headers=headers, timeout=timeout)
    weakref.finalize(owner, client.close)
    return client


class PolicyPublisher:
    """`PolicyPublisher(url, token).publish(model.state_dict()) -> version` (HF tensor names).

    `dtype`: the precision weights travel in; floating-point tensors are cast to it before
    upload. Give the engines' dtype (bf16 engines load bf16 anyway) to halve what fp32 weights
    cost to serialize, hash, upload, download and load. None sends them as they are.

    Weights travel as safetensors shards of at most `shard_bytes`, each streamed straight from
    the tensors (no serialized copy in memory) and hashed on both ends as it goes; a shard that
    arrives other than sent is sent again, on its own, as after connection trouble (a server from
    before streaming, which wants each shard's sha256 up front, gets it: the shard is hashed
    first, one more pass over its tensors). The version appears
    atomically once every shard is in. A publish that fails anyway raises with its upload id
    (`exc.upload`): `publish(state, resume=exc.upload)` sends only the shards still missing.
    The tensors are read while they are sent: do not change them until `publish` returns."""

    def __init__(self, url: str, token: str, timeout: float = 300.0, dtype: torch.dtype | None = None,
                 shard_bytes: int = SHARD_BYTES, retries: int = 3):
        self.url, self.timeout, self.dtype = url.rstrip("/"), timeout, dtype
        self.shard_bytes, self.retries = shard_bytes, retries
        self.headers = {"Authorization": f"Bearer {token}"}
        self._http = _client(self, self.headers, timeout)
        self.last_upload: dict = {}  # the last publish: upload id, shards sent and skipped

    def publish(self, state: Mapping[str, torch.Tensor], version: int | None = None, resume: str | None = None) -> int:
        if self.dtype is not None:
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        shards = [SafetensorsStream(tensors) for tensors in split_shards(state, self.shard_bytes)]
        names = [WEIGHTS_FILE] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
        upload = resume or self._call("POST", "/v1/uploads").json()["upload"]
        status = self._call("GET", f"/v1/uploads/{upload}", upload).json()
        have, digest_first = status["files"], status.get("digest_first", True)  # absent: a server from before streaming
        digests, sent = {}, 0
        for name, shard in zip(names, shards):
            held = have.get(name, {})
            digest = shard.sha256() if digest_first or held.get("size") == shard.size else None  # one pass, no send
            if digest is not None and held.get("sha256") == digest:
                digests[name] = digest  # resuming: the server has this one
            else:
                digests[name] = self._put_shard(upload, name, shard, digest if digest_first else None)
                sent += 1
        self.last_upload = {"upload": upload, "shards": len(names), "sent": sent, "skipped": len(names) - sent}
        query = f"?version={version}" if version is not None else ""
        return int(self._call("POST", f"/v1/uploads/{upload}/commit{query}", upload, json={"files": digests}).json()["version"])

    def _call(self, method: str, path: str, upload: str | None = None, **kwargs) -> httpx.Response:
        try:
            r = self._http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise _with_upload(PolicyUnavailable(f"publish failed: {exc}"), upload) from exc
        if r.status_code != 200:
            try:
                _raise_for_status(f"publish: {method} {path}", r.status_code, r.text)
            except (PolicyError, PolicyUnavailable) as exc:
                raise _with_upload(exc, upload) from None
        return r

    def _put_shard(self, upload: str, name: str, shard: SafetensorsStream, known: str | None = None) -> str:
        """One shard, streamed from the tensors and hashed as it goes (the server hashes what
        arrives: both passes overlap); its sha256. Connection trouble, or bytes that arrived other
        than sent, retries this shard only. `known`: the digest computed beforehand, sent up front
        as X-Sha256 (servers from before streaming require it); such a server refuses bytes that
        arrived damaged (HTTP 400), which raises: `publish(state, resume=exc.upload)` sends the
        shard again."""
        url = f"{self.url}/v1/uploads/{upload}/{name}"
        for attempt in range(self.retries + 1):
            digest = hashlib.sha256()

            def body():
                for chunk in shard.chunks():
                    if known is None:
                        digest.update(chunk)
                    yield chunk

            # urllib moves bulk bytes faster than httpx here
            req = urllib.request.Request(url, data=body(), method="PUT", headers={
                **self.headers, "Content-Length": str(shard.size), "Content-Type": "application/octet-stream",
                **({"X-Sha256": known} if known else {})})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    got = json.loads(r.read())["sha256"]
                sent = known or digest.hexdigest()
                if got == sent:
                    return got
                error = f"the server received other bytes (sha256 {got}, sent {sent})"
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    try:
                        _raise_for_status(f"publish: {name}", exc.code, exc.read().decode(errors="replace"))
                    except PolicyError as refused:
                        raise _with_upload(refused, upload) from None
                error = exc
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
                error = exc  # connection trouble, a timeout, or an answer without the digest
            time.sleep(0.2 * (attempt + 1))
        raise _with_upload(PolicyUnavailable(f"{name}: {error} after {self.retries + 1} attempts"), upload)


class FetchStopped(Exception):
    """Told to stop while fetching a version: downloading it, or waiting for another engine on
    this host that was (WeightCache.fetch)."""


def download_path(dest: Path, version: int, names: list[str]) -> Path:
    """Where `PolicyClient.download(version, dest)` puts a version of these files: the file
    itself for a one-file version, else a directory of its shards."""
    return dest / (f"v{version}.{WEIGHTS_FILE}" if names == [WEIGHTS_FILE] else f"v{version}")


class PolicyClient:
    """Engine side: the latest version, and verified downloads that resume after a cut.

    Failures are classified for the caller: `PolicyUnavailable` (connection trouble, HTTP 5xx;
    ask again later) or `PolicyError` (HTTP 4xx, bytes that do not match their sha256; asking
    again gets the same answer)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}  # the read (or publish) token
        self._http = _client(self, self.headers, timeout)

    def latest(self) -> int | None:
        return self._get("/v1/latest").json()["version"]

    def manifest(self, version: int) -> WeightManifest:
        import msgspec

        return msgspec.json.decode(self._get(f"/v1/versions/{version}/manifest").content, type=WeightManifest)

    def _get(self, path: str) -> httpx.Response:
        try:
            r = self._http.get(f"{self.url}{path}")
        except httpx.TransportError as exc:
            raise PolicyUnavailable(f"{self.url}{path}: {exc}") from exc
        if r.status_code != 200:
            _raise_for_status(path, r.status_code, r.text)
        return r

    def download(self, version: int, dest: Path, manifest: WeightManifest | None = None,
                 stopping: Callable[[], bool] | None = None) -> Path:
        """Fetch the version's weights into `dest` (a directory), each file verified against the
        manifest (fetched unless given): the file itself for a one-file version, else a
        directory of its shards. `stopping()`, asked between 4 MiB chunks, True raises
        FetchStopped and leaves what arrived for a later call to resume."""
        files = (manifest or self.manifest(version)).files
        dest.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in files]
        path = download_path(dest, version, names)
        if names == [WEIGHTS_FILE]:
            return self._fetch(version, files[0], path, stopping)
        path.mkdir(exist_ok=True)
        for entry in files:
            self._fetch(version, entry, path / entry.name, stopping)
        return path

    def _fetch(self, version: int, entry: FileEntry, path: Path, stopping: Callable[[], bool] | None) -> Path:
        """One file, resumed after a cut, verified against its sha256."""
        url = f"{self.url}/v1/versions/{version}/files/{entry.name}"
        for attempt in range(self.retries + 1):
            have = path.stat().st_size if path.exists() else 0
            digest = hashlib.sha256()
            try:
                if have >= entry.size:
                    digest = None  # already complete: verify from disk
                else:
                    if have:  # resume: the hash must cover the bytes already there
                        digest = sha256_of(path)
                    # urllib, not httpx, for the bulk bytes: 4x faster on loopback here (0.4 s vs 1.7 s for 538 MB)
                    req = urllib.request.Request(url, headers={**self.headers, **({"Range": f"bytes={have}-"} if have else {})})
                    with urllib.request.urlopen(req, timeout=self.timeout) as r:
                        if r.status != 206:
                            digest = hashlib.sha256()
                        # sha256 (~1 GB/s a core) on its own thread, a chunk behind the socket and the file
                        with open(path, "ab" if r.status == 206 else "wb") as f, ThreadPoolExecutor(1) as hasher:
                            hashed = None
                            while chunk := r.read(4 << 20):
                                f.write(chunk)
                                if hashed is not None:
                                    hashed.result()
                                hashed = hasher.submit(digest.update, chunk)
                                if stopping is not None and stopping():
                                    raise FetchStopped(f"stopped while downloading version {version} "
                                                       f"({entry.name}: {f.tell()} of {entry.size} bytes kept to resume)")
                            if hashed is not None:
                                hashed.result()
            except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                    _raise_for_status(url, exc.code, exc.read().decode(errors="replace"))
                if attempt == self.retries:  # 5xx or connection trouble, every time
                    raise PolicyUnavailable(f"{url}: {exc} after {attempt + 1} attempts") from exc
                time.sleep(0.2 * (attempt + 1))
                continue
            got = digest.hexdigest() if digest is not None else sha256_file(path)
            if path.stat().st_size == entry.size and got == entry.sha256:
                return path
            path.unlink()  # wrong bytes: start over
        raise PolicyError(f"version {version}: {entry.name} does not match its sha256 after {self.retries + 1} attempts")


def _with_upload(exc: Exception, upload: str | None) -> Exception:
    exc.upload = upload  # what `publish(..., resume=...)` continues
    return exc


def _raise_for_status(what: str, status: int, body: str) -> None:
    """5xx: the server cannot answer now; 4xx: it never will (missing version, wrong token)."""
    try:
        body = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        pass
    if status >= 500:
        raise PolicyUnavailable(f"{what}: HTTP {status}: {body}")
    raise PolicyError(f"{what}: HTTP {status}: {body}")
