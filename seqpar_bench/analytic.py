"""What a step must communicate and hold, from the model's shape alone: the bench checks the
measured numbers against these.

Shapes: T tokens in the step, N = tp, T_pad = T rounded up to a multiple of N, H hidden, I the MLP
width, L layers, D head dim, hq / hkv the query / KV heads on one rank, b bytes per element.
"""
from __future__ import annotations

from seqpar.config import ModelConfig, round_up


def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) on one rank; KV heads are replicated when fewer than tp."""
    return cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)


def sample_rows_per_rank(seq_lens: list[int], tp: int) -> int:
    """K on an SP step: the most sampled rows (each sequence's last) one rank owns."""
    padded = round_up(sum(seq_lens), tp)
    shard, owned, row = padded // tp, [0] * tp, 0
    for n in seq_lens:
        row += n
        owned[(row - 1) // shard] += 1
    return max(1, max(owned))


def step_collectives(cfg: ModelConfig, seq_lens: list[int], tp: int,
                     sp: bool) -> list[tuple[str, int, int]]:
    """The collectives one step must issue, in order, each as (op, rows, cols) of its logical
    tensor (the full tensor, as `LLM.comm_stats()` counts it); empty at tp = 1.

    The layout fixes them: every row-parallel matmul (attention out and MLP down, 2 per layer) and
    the vocab-parallel embedding leave partial sums that must be reduced once over the step's
    tokens: 2L + 1 all-reduces of [T, H] on a TP step; on an SP step 2L + 1 reduce-scatters of
    [T_pad, H], and before each of the 2L column-parallel matmuls one all-gather of [T_pad, H], plus
    one all-gather of the sampled rows ([N * K, H]) for the LM head. The vocab-parallel logits of
    the S sampled rows go to rank 0 in one gather of [S, V_pad]. Nothing else is needed.

    An MoE block sits where the MLP sits, with its collectives, except on an SP step with expert
    parallelism: there each routed (token, expert) pair's row goes to the expert's owner and its
    result comes back, two all-to-alls of [T x top_k, H] instead of the gather and the scatter
    (plus the routing counts, which comm_minimum adds).
    """
    if tp == 1:
        return []
    t, h, layers = sum(seq_lens), cfg.hidden_size, cfg.num_layers
    logits = ("gather", len(seq_lens), round_up(cfg.vocab_size, tp))
    if not sp:
        return [("all_reduce", t, h)] * (2 * layers + 1) + [logits]
    padded = round_up(t, tp)
    # embedding's reduction, then per layer: gather -> QKV, out -> scatter, gather -> MLP -> scatter
    attention = [("all_gather", padded, h), ("reduce_scatter", padded, h)]
    dense = attention * 2
    moe = attention + [("all_to_all", t * cfg.num_experts_per_tok, h)] * 2
    return ([("reduce_scatter", padded, h)]
            + [c for i in range(layers) for c in (moe if _ep_layer(cfg, i) else dense)]
            + [("all_gather", tp * sample_rows_per_rank(seq_lens, tp), h), logits])


def _ep_layer(cfg: ModelConfig, layer: int) -> bool:
    """An MoE layer whose experts are divided whole over the ranks (all-to-all on SP steps)."""
    return cfg.expert_parallel and layer in cfg.moe_layers


def comm_minimum(cfg: ModelConfig, seq_lens: list[int], tp: int, sp: bool,
                 nbytes: int = 4) -> dict[str, int]:
    """The logical bytes one step must move, per collective: `step_collectives` summed by op; on
    an SP step with expert parallelism also each MoE layer's routing counts, int64 [N, E] (every
    rank tells each owner how many rows it sends each of its experts)."""
    out: dict[str, int] = {}
    for op, rows, cols in step_collectives(cfg, seq_lens, tp, sp):
        out[op] = out.get(op, 0) + rows * cols * nbytes
    if sp and tp > 1:
        ep_layers = sum(_ep_layer(cfg, i) for i in range(cfg.num_layers))
        if ep_layers:
            out["all_to_all"] += ep_layers * tp * cfg.num_experts * 8
    return out


def boundary_bytes(cfg: ModelConfig, rows: int, tp: int, pp: int, sp: bool,
                   nbytes: int = 4) -> int:
    """Bytes crossing the pipeline's pp - 1 stage boundaries, summed over the ranks, for steps
    holding `rows` token rows (T on TP steps, T_pad on SP steps).

    At each boundary every TP rank sends the next stage the hidden state and the residual: on a TP
    step the full [T, H] replica of each (tp x 2 x T x H in all), on an SP step its own
    [T_pad / N, H] shard of each (2 x T_pad x H in all): 1/tp of TP.
    """
    copies = 1 if sp and tp > 1 else tp
    return (pp - 1) * copies * 2 * rows * cfg.hidden_size * nbytes


def pipeline_sampled_bytes(sampled: int, pp: int, logprobs: int = 0) -> int:
    """Bytes the last stage sends rank 0 for `sampled` rows: the sampler's float64 rows [S, 2 + 2K]
    (token, its logprob, K top ids and logprobs; worker/sampler.py), none without a pipeline
    (rank 0 is the last stage)."""
    return sampled * (2 + 2 * logprobs) * 8 if pp > 1 else 0


def wire_bytes_per_rank(logical: dict[str, int], tp: int) -> int:
    """What each rank sends for those collectives with ring algorithms: an all-reduce 2(N-1)/N of
    its payload, a reduce-scatter or an all-gather (N-1)/N: TP and SP steps send the same; an
    all-to-all (N-1)/N^2 with balanced routing."""
    share = {"all_reduce": 2 * (tp - 1) / tp, "reduce_scatter": (tp - 1) / tp,
             "all_gather": (tp - 1) / tp, "gather": (tp - 1) / tp,
             # each rank holds 1/N of an all-to-all's payload and keeps 1/N of that (balanced)
             "all_to_all": (tp - 1) / tp ** 2}
    return int(sum(share[op] * b for op, b in logical.items()))


def peak_activation(cfg: ModelConfig, tokens: int, tp: int, sp: bool, nbytes: int = 4) -> dict:
    """Predicted peak bytes a prefill step of `tokens` tokens (one sequence) allocates on one rank
    of seqpar's eager model, and its parts. The KV cache is not activation memory: the bench
    measures after a warm-up at the same token count, so the cache already holds the room.

    The peak falls in an MLP (layers/norm.py and models/llama.py keep it there: the norms write in
    place and the MLP drops its product before reducing). Alive then:
    - the residual stream and the norm output: 2 x rows x H, rows = T on a TP step and T_pad / N
      on an SP step: this is what SP shrinks by N;
    - the MLP transients, the largest of
        gathered input + gate_up:   T' x (H + 2I/N)   (SP only: the all-gathered input)
        gate_up + down output:      T' x (2I/N + H)   (silu(gate) * up is written over gate)
        down output + reduction:    T' x H + (N - 1) x T_pad / N x H on an SP step (gloo's
                                    received chunks; the shared-memory path holds only its
                                    [T_pad / N, H] sum, the same at N = 2; all-reduces work in
                                    place)
      with T' = T_pad on SP steps, T on TP steps (the MLP works on all tokens either way). The
      first two are equal and larger than the third for any Llama (2I/N > H / N).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    sp = sp and tp > 1
    t_all = round_up(tokens, tp) if sp else tokens
    rows = t_all // tp if sp else tokens
    stream = 2 * rows * h
    transient = max(t_all * (2 * i // tp + h),
                    t_all * h + ((tp - 1) * rows * h if sp else 0))
    return {"stream": stream * nbytes, "mlp": transient * nbytes,
            "total": (stream + transient) * nbytes}
