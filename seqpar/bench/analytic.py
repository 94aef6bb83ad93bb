"""What a step must communicate and hold, from the model's shape alone: the bench checks the
measured numbers against these.

Shapes: T tokens in the step, N = tp, T_pad = T rounded up to a multiple of N, H hidden, I the MLP
width, L layers, D head dim, hq / hkv the query / KV heads on one rank, b bytes per element.
"""
from __future__ import annotations

from seqpar.config import ModelConfig


def _ceil_to(x: int, n: int) -> int:
    return -(-x // n) * n


def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) on one rank; KV heads are replicated when fewer than tp."""
    return cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)


def sample_rows_per_rank(seq_lens: list[int], tp: int) -> int:
    """K on an SP step: the most sampled rows (each sequence's last) one rank owns."""
    padded = _ceil_to(sum(seq_lens), tp)
    shard, owned, row = padded // tp, [0] * tp, 0
    for n in seq_lens:
        row += n
        owned[(row - 1) // shard] += 1
    return max(1, max(owned))


def comm_minimum(cfg: ModelConfig, seq_lens: list[int], tp: int, sp: bool,
                 nbytes: int = 4) -> dict[str, int]:
    """The logical bytes one step must move, per collective, counted as `LLM.comm_stats()` counts
    them (the full tensor of each collective).

    The layout fixes them: every row-parallel matmul (attention out and MLP down, 2 per layer) and
    the vocab-parallel embedding leave partial sums that must be reduced once over the step's
    tokens: 2L + 1 all-reduces of [T, H] on a TP step; on an SP step 2L + 1 reduce-scatters of
    [T_pad, H], and before each of the 2L column-parallel matmuls one all-gather of [T_pad, H], plus
    one all-gather of the sampled rows ([N * K, H]) for the LM head. The vocab-parallel logits of
    the S sampled rows go to rank 0 in one gather of [S, V_pad]. Nothing else is needed.
    """
    if tp == 1:
        return {}
    t, h, layers = sum(seq_lens), cfg.hidden_size, cfg.num_layers
    out = {"gather": len(seq_lens) * _ceil_to(cfg.vocab_size, tp) * nbytes}
    if not sp:
        out["all_reduce"] = (2 * layers + 1) * t * h * nbytes
        return out
    padded = _ceil_to(t, tp)
    out["reduce_scatter"] = (2 * layers + 1) * padded * h * nbytes
    out["all_gather"] = (2 * layers * padded + tp * sample_rows_per_rank(seq_lens, tp)) * h * nbytes
    return out


def wire_bytes_per_rank(logical: dict[str, int], tp: int) -> int:
    """What each rank sends for those collectives with ring algorithms: an all-reduce 2(N-1)/N of
    its payload, a reduce-scatter or an all-gather (N-1)/N: TP and SP steps send the same."""
    share = {"all_reduce": 2 * (tp - 1) / tp, "reduce_scatter": (tp - 1) / tp,
             "all_gather": (tp - 1) / tp, "gather": (tp - 1) / tp}
    return int(sum(share[op] * b for op, b in logical.items()))


def peak_activation(cfg: ModelConfig, tokens: int, tp: int, sp: bool, nbytes: int = 4) -> dict:
    """Predicted peak bytes a prefill step of `tokens` tokens (one sequence, empty cache) allocates
    on one rank of seqpar's eager model, and its parts.

    The peak falls in the last layer's MLP, when every layer's KV cache is written:
    - KV cache: L x 2 x hkv x D x T (allocated by the step, whatever the mode);
    - residual stream + norm output, alive through the MLP: 2 x rows x H, rows = T on a TP step and
      T_pad / N on an SP step: this is what SP shrinks by N;
    - MLP transients, the largest of:
        gathered input + gate_up:        T' x (H + 2I/N)   (SP only: the all-gathered input does not shrink)
        gate_up + silu(gate) + product:  T' x 4I/N
        gate_up + product + down output: T' x (3I/N + H)  (+ on an SP step over gloo the reduce-
                                         scatter's all-to-all receive buffer T_pad x H and its
                                         [T_pad / N, H] sum)
      with T' = T_pad on SP steps, T on TP steps (the MLP works on all tokens either way).
    """
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    _, hkv = local_heads(cfg, tp)
    sp = sp and tp > 1
    t_all = _ceil_to(tokens, tp) if sp else tokens
    rows = t_all // tp if sp else tokens
    kv = layers * 2 * hkv * cfg.head_dim * max(tokens, 16)
    stream = 2 * rows * h
    gather = t_all * (h + 2 * i // tp) if sp else 0
    mul = t_all * 4 * i // tp
    down = t_all * (3 * i // tp + h) + ((t_all * h + rows * h) if sp else 0)
    transient = max(gather, mul, down)
    return {"kv_cache": kv * nbytes, "stream": stream * nbytes, "mlp": transient * nbytes,
            "total": (kv + stream + transient) * nbytes}
