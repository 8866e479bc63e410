"""Trainer and engine sides of the policy server: publish weights, fetch and verify them."""

from __future__ import annotations

import tempfile
import time
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
        def body():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        r = httpx.post(f"{self.url}/v1/versions", content=body(), timeout=self.timeout,
                       params={"version": version} if version is not None else None,
                       headers={"Authorization": f"Bearer {self.token}", "X-Sha256": sha256_file(path)})
        if r.status_code != 200:
            raise PolicyError(f"publish rejected ({r.status_code}): {r.json().get('error', r.text)}")
        return int(r.json()["version"])


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
            try:
                headers = {"Range": f"bytes={have}-"} if 0 < have < entry.size else {}
                if have < entry.size:
                    with httpx.stream("GET", f"{self.url}/v1/versions/{version}/files/{WEIGHTS_FILE}",
                                      headers=headers, timeout=self.timeout) as r:
                        r.raise_for_status()
                        with open(path, "ab" if r.status_code == 206 else "wb") as f:
                            for chunk in r.iter_bytes(1 << 20):
                                f.write(chunk)
            except httpx.HTTPError:
                if attempt == self.retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            if path.stat().st_size == entry.size and sha256_file(path) == entry.sha256:
                return path
            path.unlink()  # wrong bytes: start over
        raise PolicyError(f"version {version}: download does not match its sha256 after {self.retries + 1} attempts")

