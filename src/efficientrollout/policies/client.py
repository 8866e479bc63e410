"""Trainer and engine sides of the policy server: publish weights, fetch and verify them."""

from __future__ import annotations

import hashlib
import http.client
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import httpx
import torch

from .store import (
    WEIGHTS_FILE,
    PolicyError,
    PolicyUnavailable,
    WeightManifest,
    save_state_dict,
    sha256_file,
    sha256_of,
)


class PolicyPublisher:
    """`PolicyPublisher(url, token).publish(model.state_dict()) -> version` (HF tensor names).

    `dtype`: the precision weights travel in; floating-point tensors are cast to it before
    upload. Give the engines' dtype (bf16 engines load bf16 anyway) to halve what fp32 weights
    cost to serialize, hash, upload, download and load. None sends them as they are."""

    def __init__(self, url: str, token: str, timeout: float = 300.0, dtype: torch.dtype | None = None):
        self.url, self.token, self.timeout, self.dtype = url.rstrip("/"), token, timeout, dtype

    def publish(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        if self.dtype is not None:
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / WEIGHTS_FILE
            save_state_dict(state, path)
            return self.publish_file(path, version)

    def publish_file(self, path: Path, version: int | None = None) -> int:
        auth = httpx.get(f"{self.url}/v1/auth", headers={"Authorization": f"Bearer {self.token}"}, timeout=self.timeout)
        if auth.status_code != 200:  # before the upload: a server refusing mid-body just resets the connection
            raise PolicyError(f"publish rejected ({auth.status_code}): {auth.json().get('error', auth.text)}")
        query = f"?version={version}" if version is not None else ""
        with open(path, "rb") as f:  # streamed from disk in 4 MiB blocks; urllib moves bulk bytes faster than httpx here
            body = iter(lambda: f.read(4 << 20), b"")
            req = urllib.request.Request(f"{self.url}/v1/versions{query}", data=body, method="POST", headers={
                "Authorization": f"Bearer {self.token}", "X-Sha256": sha256_file(path),
                "Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return int(json.loads(r.read())["version"])
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                try:
                    detail = json.loads(detail).get("error", detail)
                except ValueError:
                    pass
                raise PolicyError(f"publish rejected ({exc.code}): {detail}") from None
            except (urllib.error.URLError, ConnectionError) as exc:
                raise PolicyError(f"publish failed: {exc}") from None


class PolicyClient:
    """Engine side: the latest version, and verified downloads that resume after a cut.

    Failures are classified for the caller: `PolicyUnavailable` (connection trouble, HTTP 5xx;
    ask again later) or `PolicyError` (HTTP 4xx, bytes that do not match their sha256; asking
    again gets the same answer)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}  # the read (or publish) token

    def latest(self) -> int | None:
        return self._get("/v1/latest").json()["version"]

    def manifest(self, version: int) -> WeightManifest:
        import msgspec

        return msgspec.json.decode(self._get(f"/v1/versions/{version}/manifest").content, type=WeightManifest)

    def _get(self, path: str) -> httpx.Response:
        try:
            r = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=self.timeout)
        except httpx.TransportError as exc:
            raise PolicyUnavailable(f"{self.url}{path}: {exc}") from exc
        if r.status_code != 200:
            _raise_for_status(path, r.status_code, r.text)
        return r

    def download(self, version: int, dest: Path) -> Path:
        """Fetch the version's weights into `dest` (a directory); verified against the manifest."""
        entry = next(f for f in self.manifest(version).files if f.name == WEIGHTS_FILE)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"v{version}.{WEIGHTS_FILE}"
        url = f"{self.url}/v1/versions/{version}/files/{WEIGHTS_FILE}"
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
                        with open(path, "ab" if r.status == 206 else "wb") as f:
                            while chunk := r.read(4 << 20):
                                digest.update(chunk)
                                f.write(chunk)
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
        raise PolicyError(f"version {version}: download does not match its sha256 after {self.retries + 1} attempts")


def _raise_for_status(what: str, status: int, body: str) -> None:
    """5xx: the server cannot answer now; 4xx: it never will (missing version, wrong token)."""
    try:
        body = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        pass
    if status >= 500:
        raise PolicyUnavailable(f"{what}: HTTP {status}: {body}")
    raise PolicyError(f"{what}: HTTP {status}: {body}")
