"""Write a random Llama checkpoint of a chosen shape (an HF model directory the engines load).

For measuring step costs at sizes where decoding is memory-bound (a GPU, a 7B-class layer)
without downloading a model: the weights are random, so costs are real and acceptance is not
(an 8-layer Llama-3-8B-shaped one's int4 drafts were accepted 0.3-0.55 on an H200, temperature
1: a real policy's are far likelier). The tokenizer is copied from
`--tokenizer` (default: the bundled SmolLM2's). Weights are drawn on `--device` (fast on a GPU).

    python scripts/make_random_checkpoint.py out/llama8b-8l --layers 8
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from efficientrollout.models.checkpoint import bundled_model_dir

TOKENIZER_FILES = ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=4096, help="defaults: Llama-3-8B's layer shape")
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.02, help="weight scale (HF's Llama init)")
    ap.add_argument("--tokenizer", help="directory with the tokenizer files (default: the bundled SmolLM2's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import AutoTokenizer, LlamaConfig

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(a.tokenizer) if a.tokenizer else bundled_model_dir()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5, rope_theta=500000.0,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(out)
    gen = torch.Generator(a.device).manual_seed(a.seed)
    head, kv = a.hidden // a.heads, a.kv_heads * (a.hidden // a.heads)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=a.device, dtype=torch.float32) * a.std).bfloat16().cpu()

    state = {"model.embed_tokens.weight": rand(config.vocab_size, a.hidden), "model.norm.weight": torch.ones(a.hidden, dtype=torch.bfloat16)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": rand(a.heads * head, a.hidden), p + "self_attn.k_proj.weight": rand(kv, a.hidden),
            p + "self_attn.v_proj.weight": rand(kv, a.hidden), p + "self_attn.o_proj.weight": rand(a.hidden, a.heads * head),
            p + "mlp.gate_proj.weight": rand(a.intermediate, a.hidden), p + "mlp.up_proj.weight": rand(a.intermediate, a.hidden),
            p + "mlp.down_proj.weight": rand(a.hidden, a.intermediate),
            p + "input_layernorm.weight": torch.ones(a.hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(a.hidden, dtype=torch.bfloat16),
        }
    save_file(state, out / "model.safetensors")
    params = sum(t.numel() for t in state.values())
    print(f"{out}: {params / 1e9:.2f}B parameters, {a.layers} layers of {a.hidden}/{a.intermediate}, in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
