"""Versioned weight storage: atomic, strictly increasing, checksummed, bounded history; an
engine picks a stored version up and a corrupt upload never becomes visible."""

from __future__ import annotations

import pytest
import torch

from efficientrollout.models import read_state_dict
from efficientrollout.policies import PolicyConflict, PolicyError, PolicyStore


def test_publish_versions_and_keep_last_n(tmp_path):
    store = PolicyStore(tmp_path, keep=2)
    for expected in (1, 2, 3):
        assert store.publish_state_dict({"w": torch.full((3,), float(expected))}) == expected
    assert store.versions() == [2, 3] and store.latest() == 3
    assert read_state_dict(store.path(3))["w"].tolist() == [3.0, 3.0, 3.0]
    store.verify(3)
    with pytest.raises(PolicyError, match="not newer"):
        store.publish_state_dict({"w": torch.zeros(1)}, version=3)


def test_corrupt_or_mismatched_uploads_are_rejected_and_invisible(tmp_path):
    store = PolicyStore(tmp_path / "store")
    store.publish_state_dict({"w": torch.ones(2)})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(PolicyError, match="not a readable safetensors"):
        store.publish_file(junk)
    good = store.path(1)
    with pytest.raises(PolicyError, match="checksum mismatch"):
        store.publish_file(good, expected_sha256="0" * 64)
    assert store.versions() == [1]
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".")]  # no leftovers
    # a stored file damaged on disk fails verification
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="sha256"):
        store.verify(1)


def test_a_publish_that_loses_the_race_for_its_number_is_a_conflict_and_leaves_nothing(tmp_path):
    store = PolicyStore(tmp_path)
    store.publish_state_dict({"w": torch.ones(2)})
    # another publisher's rename of v2 lands between our check of the latest version and ours
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model.safetensors").write_bytes(b"theirs")
    with pytest.raises(PolicyConflict, match="concurrently"):
        store.publish_state_dict({"w": torch.zeros(2)})
    assert (tmp_path / "v2" / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v2"]  # no staging or upload debris
    with pytest.raises(PolicyConflict, match="not newer"):
        store.publish_state_dict({"w": torch.zeros(2)}, version=1)


def test_engine_loads_a_stored_version(tiny_engine, tiny_dir, tmp_path):
    store = PolicyStore(tmp_path)
    state = read_state_dict(tiny_dir)
    version = store.publish_state_dict({k: v * 1.01 if "norm" in k else v for k, v in state.items()})
    store.verify(version)
    try:
        tiny_engine.update_weights(store.path(version), version=version)
        assert tiny_engine.version == version
    finally:
        tiny_engine.update_weights(state, version=0)


def test_tied_weights_are_saved_once(tmp_path):
    from safetensors import safe_open

    from efficientrollout.policies.store import save_state_dict

    embed = torch.randn(8, 4)
    save_state_dict({"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": torch.ones(4)},
                    tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["model.embed_tokens.weight", "model.norm.weight"]
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embed)


def test_a_streamed_shard_is_a_safetensors_file_of_the_same_tensors(tmp_path):
    import hashlib
    import json

    from safetensors.torch import load

    from efficientrollout.policies.store import SafetensorsStream, unique_tensors

    state = unique_tensors({
        "a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float64).to(torch.bfloat16), "scalar": torch.tensor(2.5),
        "ids": torch.arange(11), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
        "odd": torch.randint(-5, 5, (3,), dtype=torch.int8), "t": torch.randn(4, 6).t(),  # made contiguous
    })
    stream = SafetensorsStream(state)
    data = b"".join(bytes(c) for c in stream.chunks(size=16))  # tensors split across pieces
    assert len(data) == stream.size and stream.sha256() == hashlib.sha256(data).hexdigest()
    got = load(data)
    assert got.keys() == state.keys()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header_len % 8 == 0  # the data starts 8-aligned
    for k, t in state.items():  # aligned: each tensor starts at a multiple of its element size
        assert header[k]["data_offsets"][0] % t.element_size() == 0, k
    for k, t in state.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    with pytest.raises(PolicyError, match="dtype"):
        SafetensorsStream({"c": torch.zeros(2, dtype=torch.complex128)})
