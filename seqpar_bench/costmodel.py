"""A cost model of one decoder layer under TP, SP and SP + overlap, for machines we do not have.

Per layer and per rank, for a prefill step of T tokens of one sequence (T' = T_pad on SP steps):
  matmuls     roofline: max(2 T' P_l / N / F, (P_l / N + activations) b / B_mem), P_l the layer's
              weights (q, k, v, o, gate, up, down), F the matmul FLOP/s, B_mem the memory bandwidth
  attention   2 x 2 T^2 hq D / 2 causal FLOPs at the attention FLOP/s
  token-wise  2 x (residual add + RMSNorm) over the rank's rows (T, or T_pad / N with SP), plus the
              rotary and silu * up passes over all tokens: bytes moved / B_mem
  overhead    ops per layer x the per-op launch cost (Python + dispatch; kernel launch on GPUs)
  comm        TP: 2 all-reduces of [T, H]; SP: 2 reduce-scatters + 2 all-gathers of [T_pad, H].
              A collective of S bytes costs alpha + S x share / beta, share = 2(N-1)/N for an
              all-reduce and (N-1)/N for a reduce-scatter or all-gather (ring), with alpha the
              link latency per collective and beta the link bandwidth, unless the profile carries
              a measured (alpha, beta) for that collective.
  overlap     collective matmul hides the SP collectives behind the matmuls they feed: the best
              case replaces matmul + comm by max(matmul, comm) + min(matmul, comm) / N (one of
              the N chunks of the ring cannot overlap).
The SP threshold is the smallest T from which SP is faster than TP at every larger T.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from seqpar_bench.analytic import local_heads
from seqpar.config import ModelConfig, round_up

OPS_PER_LAYER_TP = 40
"""Eager ops per decoder layer on a TP step (2 norms ~9 each, 4 matmuls, rotary ~10, attention,
split/views, silu, mul, 2 all-reduces); an SP step adds 2 all-gathers and the reduce-scatter
adds (pad, sum): ~4 more."""
OPS_PER_LAYER_SP = 44


@dataclass(frozen=True)
class Hardware:
    """One device (a GPU, or one rank's share of a CPU) and its link to its TP peers."""

    name: str
    matmul_flops: float
    """Dense matmul FLOP/s reached on large shapes, in the profile's dtype."""
    attention_flops: float
    """FLOP/s of causal attention (flash kernels on GPUs; the engine's SDPA call on CPUs)."""
    mem_bw: float
    """Bytes/s of memory bandwidth (streaming kernels)."""
    link_bw: float
    """Bytes/s one rank sends to its peers (per direction) during a collective."""
    link_latency: float
    """Seconds a collective costs however small."""
    op_overhead: float
    """Seconds per eager op: Python + dispatch (+ kernel launch on a GPU)."""
    dtype_bytes: int = 2
    source: str = ""
    """Where the numbers come from: public specs (peak x an efficiency) or a measurement."""
    collectives: dict = field(default_factory=dict)
    """Measured {op: [alpha seconds, beta bytes/s]} overriding the ring model (CPU/gloo profile)."""
    ranks: int = 0
    """The tp a measured profile holds for (a CPU's cores are shared by its ranks); 0: any."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


TB, GB = 1e12, 1e9
# GPU node profiles from public specs. Matmul FLOP/s = dense bf16 peak x 0.70 (what large GEMMs
# reach); attention = peak x 0.50 (FlashAttention-2/3 forward reaches 50-75% of peak on H100);
# link = NVLink bandwidth per direction x 0.80 (NCCL bus bandwidth reached on large all-reduces);
# latency = a small NCCL collective within one node.
PROFILES: dict[str, Hardware] = {
    "h100-sxm-nvlink": Hardware(
        "h100-sxm-nvlink", matmul_flops=989 * TB * 0.70, attention_flops=989 * TB * 0.50,
        mem_bw=3.35 * TB, link_bw=450 * GB * 0.80, link_latency=15e-6, op_overhead=6e-6,
        source="H100 SXM5 spec: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s "
               "(450 GB/s per direction); efficiencies 0.70 / 0.50 / 0.80 assumed"),
    "a100-sxm-nvlink": Hardware(
        "a100-sxm-nvlink", matmul_flops=312 * TB * 0.70, attention_flops=312 * TB * 0.50,
        mem_bw=2.04 * TB, link_bw=300 * GB * 0.80, link_latency=15e-6, op_overhead=6e-6,
        source="A100 SXM4 80GB spec: 312 TFLOP/s dense bf16, 2.04 TB/s HBM2e, NVLink 3 600 GB/s "
               "(300 GB/s per direction); efficiencies 0.70 / 0.50 / 0.80 assumed"),
    "h100-pcie": Hardware(
        "h100-pcie", matmul_flops=756 * TB * 0.70, attention_flops=756 * TB * 0.50,
        mem_bw=2.0 * TB, link_bw=64 * GB * 0.80, link_latency=25e-6, op_overhead=6e-6,
        source="H100 PCIe spec: 756 TFLOP/s dense bf16, 2.0 TB/s HBM2e, PCIe 5 x16 64 GB/s per "
               "direction (no NVLink bridge); efficiencies as above"),
}
# Calibrated on the development machine (2-core AMD EPYC VM, fp32, gloo ranks whose collectives go
# through shared memory, Comm's default on one host; 1 thread per rank at tp=2) by
# `seqpar plan --calibrate --model smollm2-8h -tp 2`; regenerate it there with that command.
PROFILES["cpu-2core-gloo"] = Hardware(
    "cpu-2core-gloo", matmul_flops=5.029e+10, attention_flops=3.338e+10,
    mem_bw=2.239e+10, link_bw=1.288e+09, link_latency=4.731e-05,
    op_overhead=5.608e-05, dtype_bytes=4, ranks=2,
    collectives={"all_reduce": [4.731e-05, 1.288e+09],
                 "reduce_scatter": [5.927e-05, 2.464e+09],
                 "all_gather": [5.016e-05, 2.337e+09]},
    source=("measured by `seqpar plan --calibrate --model smollm2-8h -tp 2` on the 2-core AMD "
            "EPYC VM, 1 thread per rank, fp32, gloo ranks with shared-memory collectives"))


def load_profile(name_or_path: str) -> Hardware:
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return Hardware(**json.loads(path.read_text()))
    raise ValueError(f"unknown hardware {name_or_path!r}: a JSON profile file or one of "
                     f"{', '.join(PROFILES)}")


@dataclass
class LayerCost:
    """Seconds per decoder layer on one rank, by part."""

    matmul: float
    attention: float
    tokenwise: float
    overhead: float
    comm: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.tokenwise + self.overhead + self.comm


def _collective(hw: Hardware, op: str, nbytes: float, tp: int) -> float:
    if tp == 1:
        return 0.0
    if op in hw.collectives:
        alpha, beta = hw.collectives[op]
        return alpha + nbytes / beta
    share = 2 * (tp - 1) / tp if op == "all_reduce" else (tp - 1) / tp
    return hw.link_latency + nbytes * share / hw.link_bw


def layer_cost(cfg: ModelConfig, hw: Hardware, tokens: int, tp: int, mode: str) -> LayerCost:
    """mode: "tp", "sp" or "overlap" (SP with collective matmul, best case)."""
    b = hw.dtype_bytes
    sp = mode in ("sp", "overlap") and tp > 1
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = local_heads(cfg, tp)
    t_all = round_up(tokens, tp) if sp else tokens
    rows = t_all // tp if sp else tokens
    weights = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i // tp  # this rank's share
    # activations read and written by the 4 matmuls, on all T' tokens
    act = t_all * (h + (hq + 2 * hkv) * d + hq * d + h + h + 2 * i // tp + i // tp + h)
    matmul = max(2 * t_all * weights / hw.matmul_flops, (weights + act) * b / hw.mem_bw)
    attention = 2 * 2 * tokens * tokens * hq * d / 2 / hw.attention_flops
    # residual add + RMSNorm ~ 6 passes of [rows, H], twice; rotary ~ 6 passes of q and k;
    # silu * up ~ 4 passes of [T', I/N]
    tokenwise_elems = 2 * 6 * rows * h + 6 * tokens * (hq + hkv) * d + 4 * t_all * i // tp
    tokenwise = tokenwise_elems * b / hw.mem_bw
    overhead = (OPS_PER_LAYER_SP if sp else OPS_PER_LAYER_TP) * hw.op_overhead
    payload = t_all * h * b
    if sp:
        comm = 2 * (_collective(hw, "reduce_scatter", payload, tp) +
                    _collective(hw, "all_gather", payload, tp))
    else:
        comm = 2 * _collective(hw, "all_reduce", payload, tp)
    if mode == "overlap" and sp:
        # N chunks in a ring: all but one chunk's share of the smaller of the two hides behind
        # the larger; what stays exposed is counted as communication.
        overlapped = max(matmul, comm) + min(matmul, comm) / tp
        comm = overlapped - matmul
    return LayerCost(matmul, attention, tokenwise, overhead, comm)


def step_time(cfg: ModelConfig, hw: Hardware, tokens: int, tp: int, mode: str) -> float:
    """A whole prefill step: every layer, plus the LM head on one row (small)."""
    return cfg.num_layers * layer_cost(cfg, hw, tokens, tp, mode).total


def sp_threshold(cfg: ModelConfig, hw: Hardware, tp: int, sweep=None) -> int | None:
    sweep = sweep or [2 ** k for k in range(0, 17)]
    found = None
    for t in reversed(sweep):
        if layer_cost(cfg, hw, t, tp, "sp").total >= layer_cost(cfg, hw, t, tp, "tp").total:
            break
        found = t
    return found


def overlap_gain(cfg: ModelConfig, hw: Hardware, tokens: int, tp: int) -> float:
    """Best-case speedup of SP + collective matmul over plain SP, for the decoder layers."""
    return layer_cost(cfg, hw, tokens, tp, "sp").total / layer_cost(cfg, hw, tokens, tp, "overlap").total
