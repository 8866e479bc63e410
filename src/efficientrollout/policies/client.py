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
    WeightManifest,
    save_state_dict,
    sha256_file,
    sha256_of,
)


class PolicyPublisher:
    """`PolicyPublisher(url, token).publish(model.state_dict()) -> version` (HF tensor names)."""

    def __init__(self, url: str, token: str, timeout: float = 300.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def publish(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> int:
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
    """Engine side: the latest version, and verified downloads that resume after a cut."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries

    def latest(self) -> int | None:
        return httpx.get(f"{self.url}/v1/latest", timeout=self.timeout).json()["version"]

    def manifest(self, version: int) -> WeightManifest:
        import msgspec

        r = httpx.get(f"{self.url}/v1/versions/{version}/manifest", timeout=self.timeout)
        if r.status_code != 200:
            raise PolicyError(f"version {version}: {r.text}")
        return msgspec.json.decode(r.content, type=WeightManifest)

    def download(self, version: int, dest: Path) -> Path:
        """Fetch the version's weights into `dest` (a directory); verified against the manifest."""
        entry = next(f for f in self.manifest(version).files if f.name == WEIGHTS_FILE)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"v{version}.{WEIGHTS_FILE}"
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
                    req = urllib.request.Request(f"{self.url}/v1/versions/{version}/files/{WEIGHTS_FILE}",
                                                 headers={"Range": f"bytes={have}-"} if have else {})
                    with urllib.request.urlopen(req, timeout=self.timeout) as r:
                        if r.status != 206:
                            digest = hashlib.sha256()
                        with open(path, "ab" if r.status == 206 else "wb") as f:
                            while chunk := r.read(4 << 20):
                                digest.update(chunk)
                                f.write(chunk)
            except (OSError, http.client.HTTPException):  # URLError is an OSError
                if attempt == self.retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            got = digest.hexdigest() if digest is not None else sha256_file(path)
            if path.stat().st_size == entry.size and got == entry.sha256:
                return path
            path.unlink()  # wrong bytes: start over
        raise PolicyError(f"version {version}: download does not match its sha256 after {self.retries + 1} attempts")

