"""Tiny random HF checkpoints for every supported family, saved locally, and the HF reference."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

# name -> (config class name, config kwargs). Shapes are tiny but keep every structural case:
# GQA, KV-head replication (kv < tp), a vocab no tp divides, tied and untied embeddings, biases,
# q/k norms, Llama-3 rope scaling.
COMMON = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # GQA (2 query heads per KV head), head_dim set apart from hidden/heads, Llama-3 rope scaling,
    # untied; vocab 1001 is divisible by neither 2 nor 3.
    "llama-gqa": ("LlamaConfig", dict(vocab_size=1001, num_attention_heads=12, num_key_value_heads=6,
                                      head_dim=8, tie_word_embeddings=False, rope_theta=500000.0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    # One KV head: every tp > 1 replicates it; tied embeddings; biases on q, k, v and o.
    "llama-mqa-tied": ("LlamaConfig", dict(vocab_size=997, num_attention_heads=6, num_key_value_heads=1,
                                           tie_word_embeddings=True, attention_bias=True)),
    # A sliding window shorter than the longest test sequence.
    "mistral": ("MistralConfig", dict(vocab_size=1000, num_attention_heads=6, num_key_value_heads=6,
                                      tie_word_embeddings=False, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(vocab_size=1003, num_attention_heads=6, num_key_value_heads=1,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(vocab_size=1002, num_attention_heads=12, num_key_value_heads=6,
                                  head_dim=16, tie_word_embeddings=False)),
}
# Mixture-of-experts families, apart from FAMILIES (their tests switch expert parallelism too).
# 6 experts: whole experts divide over 1, 2 and 3 ranks; every expert width divides by 2 and 3.
MOE_FAMILIES = {
    # Every layer sparse, experts as wide as intermediate_size, top-2 renormalized; GQA.
    "mixtral": ("MixtralConfig", dict(vocab_size=1001, num_attention_heads=12, num_key_value_heads=6,
                                      head_dim=8, tie_word_embeddings=False, num_local_experts=6,
                                      num_experts_per_tok=2)),
    # A shared expert behind a sigmoid gate, q/k/v biases, top-2 not renormalized, one KV head
    # (replicated at tp > 1), tied; layer 1 dense (mlp_only_layers).
    "qwen2-moe": ("Qwen2MoeConfig", dict(vocab_size=997, num_attention_heads=6, num_key_value_heads=1,
                                         tie_word_embeddings=True, num_hidden_layers=3,
                                         num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=24,
                                         shared_expert_intermediate_size=36, norm_topk_prob=False,
                                         mlp_only_layers=[1])),
    # q/k norms, top-3 renormalized; decoder_sparse_step 2 keeps layer 0 dense.
    "qwen3-moe": ("Qwen3MoeConfig", dict(vocab_size=1002, num_attention_heads=12, num_key_value_heads=6,
                                         head_dim=16, tie_word_embeddings=False, num_experts=6,
                                         num_experts_per_tok=3, moe_intermediate_size=24,
                                         norm_topk_prob=True, decoder_sparse_step=2)),
}


def valid_tp(family: str) -> list[int]:
    kv = {**FAMILIES, **MOE_FAMILIES}[family][1]["num_key_value_heads"]
    return [tp for tp in (1, 2, 3) if kv % tp == 0 or tp % kv == 0]


def build(family: str, root: Path, **overrides) -> Path:
    """Save a random checkpoint of `family` under root/family (once) and return its directory.
    overrides: config fields set otherwise (e.g. num_hidden_layers=4), named in the directory."""
    out = root / "-".join([family, *(f"{k}={v}" for k, v in sorted(overrides.items()))])
    if (out / "config.json").is_file():
        return out
    cls_name, kwargs = {**FAMILIES, **MOE_FAMILIES}[family]
    config = getattr(transformers, cls_name)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are not all ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    return out


def _hf_model(model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_reference(model_dir: Path, prompts: list[list[int]], max_tokens: int):
    """Greedy tokens and the chosen tokens' logprobs from HF transformers, one prompt at a time,
    by full forwards without a cache (the simplest independent reference)."""
    model = _hf_model(model_dir)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids, logprobs = list(prompt), []
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                token = int(logits.argmax())
                logprobs.append(torch.log_softmax(logits, -1)[token].item())
                ids.append(token)
            results.append((ids[len(prompt):], logprobs))
    return results


def hf_next_logprobs(model_dir: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """HF transformers' log_softmax over the vocab [V] of the token after each sequence."""
    model = _hf_model(model_dir)
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                for ids in sequences]


def chosen_logprobs(output) -> list[float]:
    """The chosen token's logprob at each step of a seqpar RequestOutput."""
    return [step[token] for step, token in zip(output.logprobs, output.token_ids)]


def paged_kv(model, num_blocks: int = 8, block_size: int = 16) -> None:
    """Fresh zeroed K and V block pools, [num_blocks, block_size, kv_heads, D], for every Attention
    of a seqpar model built by hand (the Worker allocates them in an engine)."""
    from seqpar.layers.attention import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.k_cache = torch.zeros(num_blocks, block_size, m.num_kv_heads, m.head_dim)
            m.v_cache = torch.zeros_like(m.k_cache)


def assert_matches(outputs, expected, what: str) -> None:
    """seqpar RequestOutputs against hf_reference's (tokens, logprobs): greedy tokens identical,
    each chosen token's logprob within 2e-4."""
    for i, (out, (tokens, logprobs)) in enumerate(zip(outputs, expected)):
        assert out.token_ids == tokens, f"{what}: prompt {i} greedy tokens differ from HF"
        worst = max(abs(a - b) for a, b in zip(chosen_logprobs(out), logprobs))
        assert worst <= 2e-4, f"{what}: prompt {i} logprob differs from HF by {worst:.2e}"
