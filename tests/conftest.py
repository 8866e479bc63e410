"""Shared fixtures: tiny random checkpoints of each supported family (real HF directories,
written by transformers itself) and the bundled SmolLM2."""

from __future__ import annotations

import pytest
import torch

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.models.checkpoint import bundled_model_dir
from efficientrollout.queue import RedisServer
from efficientrollout.speculation import SpeculationConfig

PLAIN = SpeculationConfig(mode="plain")

torch.set_num_threads(2)


def build_tiny_checkpoint(path, family: str, seed: int = 0, tie: bool = True, head_dim: int = 16):
    """Save a 2-layer random model of `family` with the bundled tokenizer; returns the HF model."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[family]
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # large enough weights that argmaxes are decisive, not near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else 0.3))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="session")
def tiny64_dir(tmp_path_factory):
    """The tiny Llama with SmolLM2's head size (64), which our bf16 attention kernel serves."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    build_tiny_checkpoint(path, "llama", head_dim=64)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    return NativeEngine(EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=256, speculation=PLAIN))


@pytest.fixture(scope="session")
def smollm2_engine():
    return NativeEngine(EngineConfig(dtype="float32", max_batch_size=8, max_seq_len=512, speculation=PLAIN))


@pytest.fixture()
def redis_server(tmp_path):
    with RedisServer(tmp_path / "redis", appendfsync="always") as server:
        yield server
