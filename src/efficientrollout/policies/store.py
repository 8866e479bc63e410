"""Versioned weight snapshots on disk: the policy server's storage.

Layout: `<root>/v<N>/{model.safetensors | model-00001-of-0000K.safetensors ..., manifest.json}`
(one file, or shards: a large policy never has to travel as one body or sit in one file in
memory). A version becomes visible only by an atomic rename of a fully written and verified
temporary directory, so a half-written or corrupt upload is never served. Versions strictly
increase; the newest `keep` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec
import torch

from ..protocol import FileEntry, WeightManifest

WEIGHTS_FILE = "model.safetensors"
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def valid_file_name(name: str) -> bool:
    m = _SHARD.fullmatch(name)
    return name == WEIGHTS_FILE or (m is not None and 1 <= int(m.group(1)) <= int(m.group(2)))


def check_file_names(names: list[str]) -> None:
    """A version is `model.safetensors`, or shards `model-0000i-of-0000K.safetensors` for i = 1..K."""
    if names != [WEIGHTS_FILE] and sorted(names) != [shard_name(i, len(names)) for i in range(len(names))]:
        raise PolicyError(f"files must be {WEIGHTS_FILE} or shards model-0000i-of-0000K.safetensors, "
                          f"each of 1..K once: got {sorted(names)}")


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


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named tensors as contiguous CPU tensors, each stored once: tensors that share memory
    (tied embeddings: `lm_head.weight` is `model.embed_tokens.weight`) keep the first name, as
    `model.state_dict()` of a tied model needs."""
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
                       torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64",
                       torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16"}


class SafetensorsStream:
    """A safetensors file's bytes, produced tensor by tensor from contiguous CPU tensors (as
    `unique_tensors` gives them): its size is known up front and no tensor is copied, where
    `safetensors.torch.save` builds the whole file in memory first (0.8 s for SmolLM2's 538 MB
    here, before any byte is sent). Widest dtypes first, then by name, as safetensors lays them
    out: every tensor's offset is a multiple of its element size. The bytes are read from the
    tensors while they are sent: they must not change until then."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        if sys.byteorder != "little":
            raise PolicyError("safetensors files are little-endian; this host is not")
        tensors = dict(sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
        header, offset = {}, 0
        for name, t in tensors.items():
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise PolicyError(f"{name}: dtype {t.dtype} has no safetensors name here")
            n = t.numel() * t.element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the format's 8-byte alignment of the data
        self.head, self.tensors = struct.pack("<Q", len(head)) + head, tensors
        self.size = len(self.head) + offset

    def chunks(self, size: int = 4 << 20):
        """The file's bytes in pieces of at most `size` (memoryviews of the tensors)."""
        yield self.head
        for t in self.tensors.values():
            if t.numel():
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                for i in range(0, len(data), size):
                    yield data[i : i + size]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write HF-named tensors to one safetensors file (shared tensors once, see unique_tensors)."""
    from safetensors.torch import save_file

    save_file(unique_tensors(state), path)


def split_shards(state: Mapping[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most `shard_bytes` each (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in unique_tensors(state).items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


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
        digest = digest or sha256_file(file)
        if expected_sha256 is not None and digest != expected_sha256:
            raise PolicyError(f"checksum mismatch: got {digest}, expected {expected_sha256}")
        return self.publish_files({WEIGHTS_FILE: (file, digest)}, version, move)

    def publish_files(self, files: Mapping[str, tuple[Path, str]], version: int | None = None, move: bool = False) -> int:
        """Store `{name: (path, sha256)}` (one file or all shards, hashed by the caller as they
        arrived) as the next version (or `version`, if larger), atomically."""
        from safetensors import safe_open

        check_file_names(list(files))
        latest = self.latest() or 0
        version = latest + 1 if version is None else version
        if version <= latest:
            raise PolicyConflict(f"version {version} is not newer than the latest ({latest})")
        tensors = 0
        for name, (file, _) in files.items():
            try:
                with safe_open(file, framework="pt") as f:
                    tensors += len(list(f.keys()))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise PolicyError(f"{name}: not a readable safetensors file: {exc}") from exc
        if not tensors:
            raise PolicyError("the upload holds no tensors")
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".stage."))
        try:
            entries = []
            for name, (file, digest) in sorted(files.items()):
                entries.append(FileEntry(name, file.stat().st_size, digest))
                (os.replace if move else shutil.copyfile)(file, staging / name)
            (staging / "manifest.json").write_bytes(msgspec.json.encode(WeightManifest(version, time.time(), entries)))
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
