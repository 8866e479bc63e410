"""Checkpoint loading: every supported family matches transformers; bad checkpoints fail loudly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_checkpoint

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.models import CheckpointError, load_model


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_family_logits_match_transformers(tmp_path, family, tie):
    hf = build_tiny_checkpoint(tmp_path, family, seed=3, tie=tie)
    if family == "qwen2":  # Qwen2 carries q/k/v biases: make them matter
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        hf.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, torch.float32, torch.device("cpu"), max_seq_len=64)
    from efficientrollout.engines.native.runner import ModelRunner

    runner = ModelRunner(loaded.decoder, max_batch_size=2, max_seq_len=64)
    ids = [[5, 17, 300, 42, 9, 1000, 77], [8, 6, 7, 5]]
    last = runner.prefill(ids, slots=[0, 1])
    with torch.no_grad():
        ref = [hf(torch.tensor([row])).logits[0, -1] for row in ids]
        assert torch.allclose(last, torch.stack(ref), atol=1e-4)
        # one decode step per row on top of the cache
        nxt = runner.decode([3, 4], [len(ids[0]), len(ids[1])])
        ref = [hf(torch.tensor([row + [t]])).logits[0, -1] for row, t in zip(ids, (3, 4))]
    assert torch.allclose(nxt, torch.stack(ref), atol=1e-4)


def test_missing_and_unsupported_checkpoints_name_the_file(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="no such model directory"):
        NativeEngine(EngineConfig(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty", torch.float32, torch.device("cpu"), 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2' is not supported"):
        load_model(broken, torch.float32, torch.device("cpu"), 32)
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_model(broken, torch.float32, torch.device("cpu"), 32)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(broken, torch.float32, torch.device("cpu"), 32)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cached_attention_matches_sdpa(dtype, atol):
    from efficientrollout.models.decoder import cached_attention

    torch.manual_seed(0)
    b, H, Hkv, T, S, D = 3, 6, 2, 4, 20, 16
    q, keys, values = (torch.randn(b, h, n, D, dtype=dtype) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    positions = torch.tensor([[16, 17, 18, 19], [5, 6, 7, 8], [10, 11, 12, 13]])  # rows at different depths
    mask = (torch.arange(S) <= positions[:, :, None])[:, None]  # [b, 1, T, S]
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cached_attention(q, keys, values, mask), want, atol=atol, rtol=0)
