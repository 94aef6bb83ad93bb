"""Models the bench runs: any `--model` seqpar accepts, plus SmolLM2-shaped twins for other tp.

SmolLM2-135M has 9 query heads and 3 KV heads, so it splits over 1 or 3 ranks only. "smollm2-8h"
is a random Llama of SmolLM2's shape (hidden 576, 30 layers, MLP 1536, vocab 49152, tied
embeddings, rope theta 1e5) with 8 heads of 72 and 2 KV heads, so tp=2 works: the same matmul
FLOPs per token as SmolLM2 (q/o projections 576 x 576), K/V projections 144 wide instead of 192.
"smollm2-64d" (hidden 512, 8 heads of 64) is the tp=2 model beside vLLM, whose CPU attention has
no 72-dim kernel. Timing does not depend on the weights' values (generation ignores EOS), so
random weights serve.
"""
from __future__ import annotations

from pathlib import Path

from seqpar.loader.resolve import cache_dir, resolve_model

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
SYNTHETIC = {
    "smollm2-8h": dict(SMOLLM2_SHAPE, num_attention_heads=8, num_key_value_heads=2, head_dim=72),
    # 64-dim heads (vLLM's CPU attention has no kernel for 72) over hidden 512: tp=2 beside vLLM.
    "smollm2-64d": dict(SMOLLM2_SHAPE, hidden_size=512, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=64),
    # Every MLP replaced by 8 experts of the MLP's width, top-2 (seqpar_bench/moe.py).
    "smollm2-moe": dict(SMOLLM2_SHAPE, model_type="mixtral", num_attention_heads=8,
                        num_key_value_heads=2, head_dim=72, num_local_experts=8,
                        num_experts_per_tok=2),
}
DESCRIPTIONS = {
    "smollm2": "SmolLM2-135M-Instruct (real weights; 9 heads / 3 KV heads: tp 1 or 3)",
    "smollm2-8h": "random Llama of SmolLM2's shape with 8 heads / 2 KV heads (head_dim 72), for tp 2",
    "smollm2-64d": "random Llama of SmolLM2's class (30 layers, MLP 1536) with hidden 512, 8 heads "
                   "of 64 / 2 KV heads, for tp 2 beside vLLM",
    "smollm2-moe": "random Mixtral of smollm2-8h's shape, 8 experts of width 1536 per layer, top-2",
}


def resolve(name: str) -> Path:
    """An HF directory for `name`: a synthetic twin (built once into the cache) or seqpar's own."""
    if name in SYNTHETIC:
        return build_synthetic(name, cache_dir() / "bench")
    return resolve_model(name)


def describe(name: str) -> str:
    return DESCRIPTIONS.get(name, name)


def build_synthetic(name: str, root: Path, seed: int = 0) -> Path:
    out = root / name
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers
    fields = dict(SYNTHETIC[name])
    config = transformers.AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tmp = root / f".{name}.tmp"
    model.save_pretrained(tmp)
    tmp.rename(out)  # appears complete or not at all
    return out
