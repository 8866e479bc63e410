"""Versioned weight snapshots on disk: the policy server's storage.

Layout: `<root>/v<N>/{model.safetensors, manifest.json}`. A version becomes visible only by
an atomic rename of a fully written and verified temporary directory, so a half-written or
corrupt upload is never served. Versions strictly increase; the newest `keep` are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec
import torch

from ..protocol import FileEntry, WeightManifest

WEIGHTS_FILE = "model.safetensors"


class PolicyError(ValueError):
    """A publish or fetch that is rejected; the store is unchanged. Permanent: asking again
    gets the same answer."""


class PolicyConflict(PolicyError):
    """The version asked for exists already (or is older than the latest): another publish won."""


class PolicyUnavailable(RuntimeError):
    """The policy server could not answer now (connection refused or cut, HTTP 5xx): try later."""


def sha256_of(path: Path, chunk: int = 1 << 20):
    """A sha256 object fed with the file's bytes (callers may go on feeding it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: Path) -> str:
    return sha256_of(path).hexdigest()


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write HF-named tensors to one safetensors file (CPU, contiguous). Tensors that share
    memory (tied embeddings: `lm_head.weight` is `model.embed_tokens.weight`) are written once,
    under the first name, as `model.state_dict()` of a tied model needs."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    save_file(out, path)


class PolicyStore:
    def __init__(self, root: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*") if p.name[1:].isdigit() and (p / "manifest.json").is_file())

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def manifest(self, version: int) -> WeightManifest:
        path = self.root / f"v{version}" / "manifest.json"
        if not path.is_file():
            raise PolicyError(f"version {version} does not exist (have {self.versions()})")
        return msgspec.json.decode(path.read_bytes(), type=WeightManifest)

    def path(self, version: int, name: str = WEIGHTS_FILE) -> Path:
        entry = next((f for f in self.manifest(version).files if f.name == name), None)
        if entry is None:
            raise PolicyError(f"version {version} has no file {name!r}")
        return self.root / f"v{version}" / name

    def publish_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".upload.") as tmp:
            file = Path(tmp) / WEIGHTS_FILE
            save_state_dict(state, file)
            return self.publish_file(file, version, expected_sha256=None)

    def publish_file(self, file: Path, version: int | None = None, expected_sha256: str | None = None,
                     digest: str | None = None, move: bool = False) -> int:
        """Store an uploaded safetensors file as the next version (or `version`, if larger).
        `digest`: its sha256 if the caller already hashed it while receiving; `move`: take the
        file (same filesystem) instead of copying it."""
        from safetensors import safe_open

        latest = self.latest() or 0
        version = latest + 1 if version is None else version
        if version <= latest:
            raise PolicyConflict(f"version {version} is not newer than the latest ({latest})")
        digest = digest or sha256_file(file)
        if expected_sha256 is not None and digest != expected_sha256:
            raise PolicyError(f"checksum mismatch: got {digest}, expected {expected_sha256}")
        try:
            with safe_open(file, framework="pt") as f:
                if not list(f.keys()):
                    raise PolicyError("the upload holds no tensors")
        except PolicyError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise PolicyError(f"the upload is not a readable safetensors file: {exc}") from exc
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".stage."))
        try:
            size = file.stat().st_size
            (os.replace if move else shutil.copyfile)(file, staging / WEIGHTS_FILE)
            manifest = WeightManifest(version, time.time(), [FileEntry(WEIGHTS_FILE, size, digest)])
            (staging / "manifest.json").write_bytes(msgspec.json.encode(manifest))
            try:  # atomic: the version appears whole or not at all
                os.rename(staging, self.root / f"v{version}")
            except OSError as exc:  # a concurrent publish took this number first (the target exists)
                if not (self.root / f"v{version}").exists():
                    raise
                raise PolicyConflict(f"version {version} was published concurrently by someone else") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for old in self.versions()[: -self.keep]:
            shutil.rmtree(self.root / f"v{old}", ignore_errors=True)
        return version

    def verify(self, version: int) -> None:
        """Raise PolicyError if any stored file no longer matches its manifest."""
        for entry in self.manifest(version).files:
            path = self.root / f"v{version}" / entry.name
            if not path.is_file() or sha256_file(path) != entry.sha256:
                raise PolicyError(f"version {version}: {entry.name} does not match its sha256")
