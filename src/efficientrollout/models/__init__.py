"""Checkpoints in, our decoder out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    DEFAULT_MODEL,
    WeightError,
    check_state_dict,
    read_state_dict,
    resolve_model,
)
from .config import CheckpointError, ModelConfig, model_config_from_hf, rope_inv_freq
from .decoder import Decoder, KVCache

__all__ = [
    "DEFAULT_MODEL", "CheckpointError", "Decoder", "KVCache", "LoadedModel", "ModelConfig", "WeightError",
    "load_model", "load_weights", "read_state_dict",
]


@dataclass(slots=True)
class LoadedModel:
    decoder: Decoder
    tokenizer: object  # a transformers tokenizer
    path: Path
    eos_token_ids: frozenset[int]


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = resolve_model(model)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    cfg = model_config_from_hf(hf_config, str(path / "config.json"))
    inv_freq, rope_scale = rope_inv_freq(hf_config)
    decoder = Decoder.empty(cfg, inv_freq, rope_scale, max_seq_len, dtype, device)
    load_weights(decoder, read_state_dict(path), str(path))
    decoder.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = set()
    for source in (hf_config, _generation_config(GenerationConfig, path), tokenizer):
        ids = getattr(source, "eos_token_id", None)
        eos.update([ids] if isinstance(ids, int) else ids or [])
    return LoadedModel(decoder, tokenizer, path, frozenset(eos))


def _generation_config(cls, path: Path):
    try:
        return cls.from_pretrained(path)
    except OSError:
        return None


def load_weights(decoder: Decoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF-named state dict into the decoder in place, all or nothing."""
    views = decoder.hf_parameter_views()
    check_state_dict(views, state, decoder.cfg.tie_word_embeddings, source)
    with torch.no_grad():
        for name, view in views.items():
            view.copy_(state[name])
    decoder.pack_weights()
