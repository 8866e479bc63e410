"""The decoder's own view of a checkpoint's architecture.

We read transformers' config objects (so every field keeps its upstream meaning) and keep only
what our decoder implements; anything we would silently get wrong is rejected here, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")
# RoPE variants whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or of an architecture we do not implement."""


@dataclass(slots=True, frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool  # Qwen2: biases on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool
    max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise CheckpointError(f"model_type {self.family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def model_config_from_hf(hf_config, source: str) -> ModelConfig:
    """Map a transformers config onto ModelConfig; `source` names the file in error messages."""
    family = getattr(hf_config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
    rope = _rope_parameters(hf_config)
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        raise CheckpointError(f"{source}: rope_type {rope.get('rope_type')!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
    if getattr(hf_config, "use_sliding_window", False) or getattr(hf_config, "layer_types", None) and any(
        t != "full_attention" for t in hf_config.layer_types
    ):
        raise CheckpointError(f"{source}: sliding-window attention is not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise CheckpointError(f"{source}: mlp_bias=True is not supported")
    heads = hf_config.num_attention_heads
    return ModelConfig(
        family=family,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate_size=hf_config.intermediate_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        attention_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def _rope_parameters(hf_config) -> dict:
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if "full_attention" in rope:  # per-layer-type layout
        rope = rope["full_attention"]
    return dict(rope)


def rope_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, computed by transformers' own
    RoPE initialisers so that scaled variants (llama3, yarn, linear) match the reference exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = _rope_parameters(hf_config).get("rope_type", "default")
    if rope_type == "default":
        theta = _rope_parameters(hf_config).get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv.float(), float(scale)
