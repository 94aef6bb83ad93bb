"""`seqpar plan`: the cost model's predictions for a model x tp x hardware, and `--calibrate`, which
measures this machine's profile (matmul and attention FLOP/s, memory bandwidth, per-op overhead,
and each collective's latency and bandwidth on the real gloo group)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar_bench.analytic import local_heads
from seqpar_bench.costmodel import PROFILES, Hardware, layer_cost, load_profile, overlap_gain, sp_threshold
from seqpar_bench.timing import median_time
from seqpar.config import ModelConfig
from seqpar.distributed.comm import Comm

DEFAULT_TOKENS = (1, 16, 128, 512, 2048, 8192)


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.3f} ms"


def plan_table(cfg: ModelConfig, hw: Hardware, tp: int, tokens) -> str:
    lines = [f"hardware {hw.name}: {hw.source}",
             f"per decoder layer, one rank, tp={tp} ({cfg.num_layers} layers)",
             f"{'tokens':>7} {'mode':>8} {'matmul':>12} {'attention':>12} {'token-wise':>12} "
             f"{'overhead':>12} {'comm':>12} {'total':>12} {'x TP':>6}"]
    for t in tokens:
        base = layer_cost(cfg, hw, t, tp, "tp").total
        for mode in (("tp", "sp", "overlap") if tp > 1 else ("tp",)):
            c = layer_cost(cfg, hw, t, tp, mode)
            lines.append(f"{t:>7} {mode:>8} {_fmt_s(c.matmul)} {_fmt_s(c.attention)} "
                         f"{_fmt_s(c.tokenwise)} {_fmt_s(c.overhead)} {_fmt_s(c.comm)} "
                         f"{_fmt_s(c.total)} {base / c.total:6.3f}")
    if tp > 1:
        thr = sp_threshold(cfg, hw, tp)
        lines.append(f"SP token threshold: {'never' if thr is None else thr} "
                     "(SP faster than TP from there on)")
        big = max(tokens)
        lines.append(f"best possible overlap gain over SP at {big} tokens: "
                     f"{overlap_gain(cfg, hw, big, tp):.3f}x per layer")
    return "\n".join(lines)


# ---- calibration ----------------------------------------------------------------------------

def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """time = alpha + bytes / beta over (bytes, seconds) points -> (alpha, beta), by least squares
    on relative errors (weights 1 / time^2), so the small sizes fix alpha and the large ones beta."""
    w = [1.0 / max(y, 1e-9) ** 2 for _, y in points]
    sw = sum(w)
    sx = sum(wi * x for wi, (x, _) in zip(w, points))
    sy = sum(wi * y for wi, (_, y) in zip(w, points))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, points))
    sxy = sum(wi * x * y for wi, (x, y) in zip(w, points))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    alpha = (sy - slope * sx) / sw
    return max(0.0, alpha), 1.0 / max(slope, 1e-15)


class Calibration:
    """Runs on every rank of a gloo group at once, so each measures with its peers busy too."""

    def __init__(self, rank: int, world: int, model_dir: str):
        self.rank, self.world = rank, world
        self.cfg = ModelConfig.from_dir(model_dir)

    def _sync(self):
        if self.world > 1:
            dist.barrier()

    def compute(self) -> dict:
        cfg, n = self.cfg, self.world
        h, i = cfg.hidden_size, cfg.intermediate_size
        self._sync()
        # The model's largest matmul (gate_up) on 2048 tokens.
        x, w = torch.randn(2048, h), torch.randn(2 * i // n, h)
        matmul = 2 * 2048 * h * (2 * i // n) / median_time(lambda: F.linear(x, w))
        # Streaming: c = a + b over 64 MiB arrays moves 3 x 64 MiB.
        a, b, c = torch.randn(1 << 24), torch.randn(1 << 24), torch.empty(1 << 24)
        mem_bw = 3 * a.numel() * 4 / median_time(lambda: torch.add(a, b, out=c))
        # The engine's attention call (layers/attention.py): one causal sequence of 2048 tokens,
        # GQA, [1, heads, T, D] so the CPU takes its fused kernel as the engine does.
        (hq, hkv), d = local_heads(cfg, n), cfg.head_dim
        t = 2048
        q, k, v = torch.randn(1, hq, t, d), torch.randn(1, hkv, t, d), torch.randn(1, hkv, t, d)
        attn_s = median_time(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=hq != hkv), reps=3)
        attention = 2 * 2 * t * t * hq * d / 2 / attn_s
        # One tiny op: the floor of every eager op's cost.
        y = torch.randn(1, h)
        op = median_time(lambda: [torch.add(y, y) for _ in range(1000)]) / 1000
        self._sync()
        return {"matmul_flops": matmul, "mem_bw": mem_bw, "attention_flops": attention,
                "tiny_op_s": op}

    def collectives(self) -> dict:
        comm = Comm(dist.group.WORLD, self.rank, self.world)
        h = self.cfg.hidden_size
        points = {"all_reduce": [], "reduce_scatter": [], "all_gather": []}
        for t in (16, 256, 1024, 4096, 8192):
            x = torch.randn(t, h)
            shard = torch.randn(t // self.world, h)
            nbytes = t * h * 4
            points["all_reduce"].append((nbytes, median_time(lambda: comm.all_reduce(x.clone()))))
            points["reduce_scatter"].append(
                (nbytes, median_time(lambda: comm.reduce_scatter_tokens(x, t))))
            points["all_gather"].append((nbytes, median_time(lambda: comm.all_gather_tokens(shard))))
        return {op: list(_fit(p)) for op, p in points.items()}

    def close(self) -> None:
        pass


def calibrate(model: str, tp: int, threads: int | None, name: str) -> Hardware:
    """Measure this machine as `tp` ranks of `threads` threads each; fit the per-op overhead to
    seqpar's own prefill of 16 tokens (the one point fitted to the engine; the rest is measured
    by micro-benchmarks)."""
    from seqpar_bench.hosts import Host
    from seqpar_bench.catalog import resolve
    from seqpar_bench.subjects import SeqparSubject
    model_dir = str(resolve(model))
    cfg = ModelConfig.from_dir(model_dir)
    threads = threads or max(1, (os.cpu_count() or 1) // tp)
    host = Host(Calibration, world=tp, threads=threads, args=(model_dir,), name="calibrate")
    try:
        compute = host.call("compute")
        coll = host.call("collectives") if tp > 1 else {}
    finally:
        host.close()
    ar = coll.get("all_reduce", [0.0, 1e12])
    hw = Hardware(name, matmul_flops=compute["matmul_flops"],
                  attention_flops=compute["attention_flops"], mem_bw=compute["mem_bw"],
                  link_bw=ar[1] * 2 * (tp - 1) / tp if tp > 1 else 1e12, link_latency=ar[0],
                  op_overhead=compute["tiny_op_s"], dtype_bytes=4, collectives=coll, ranks=tp,
                  source=f"measured by `seqpar plan --calibrate --model {model} -tp {tp}` on "
                         f"{os.cpu_count()} cores, {threads} thread(s) per rank, fp32, gloo")
    # Fit the eager overhead per op on a 16-token prefill, where it dominates.
    llm = Host(SeqparSubject, threads=threads, name="seqpar",
               args=(model_dir, tp, threads, 64, "float32", {}))
    try:
        ids = list(range(1, 17))
        measured = statistics.median(llm.call("prefill", ids, {"mode": "off"}) for _ in range(7))
    finally:
        llm.close()
    hw0 = replace(hw, op_overhead=0.0)
    rest = cfg.num_layers * layer_cost(cfg, hw0, 16, tp, "tp").total
    from seqpar_bench.costmodel import OPS_PER_LAYER_TP
    per_op = max(compute["tiny_op_s"], (measured - rest) / (cfg.num_layers * OPS_PER_LAYER_TP))
    return replace(hw, op_overhead=per_op)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="seqpar plan", description=__doc__)
    p.add_argument("--model", default="smollm2",
                   help="a model as for seqpar generate, a bench twin (smollm2-8h), a public "
                        "shape (llama-3-8b, llama-3-70b) or a Hugging Face config.json")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=None,
                   help="TP ranks (default: the largest of 8, 4, 3, 2, 1 the model allows; "
                        "2 when calibrating)")
    p.add_argument("--hardware", default="h100-sxm-nvlink",
                   help=f"a profile ({', '.join(PROFILES)}) or a JSON file from --calibrate")
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                   help="prefill token counts to predict")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine's profile instead (spawns tp gloo ranks)")
    p.add_argument("--threads", type=int, default=None, help="threads per rank when calibrating")
    p.add_argument("--out", default=None, help="with --calibrate: write the profile JSON here")
    p.add_argument("--json", action="store_true", help="print the profile / predictions as JSON")
    args = p.parse_args(argv)
    tp = args.tensor_parallel_size
    if args.calibrate:
        tp = tp or 2
        hw = calibrate(args.model, tp, args.threads, name=f"cpu-{os.cpu_count()}core-gloo")
        text = hw.to_json()
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
        return 0
    cfg = _model_config(args.model)
    hw = load_profile(args.hardware)
    from seqpar_bench.suite import valid_tp
    if tp is None:
        tp = next(t for t in (8, 4, 3, 2, 1) if valid_tp(cfg, t) is None)
    if why := valid_tp(cfg, tp):
        raise ValueError(f"tensor_parallel_size={tp} does not fit {args.model}: {why}")
    if args.json:
        print(json.dumps({"hardware": asdict(hw), "layers": {
            t: {m: asdict(layer_cost(cfg, hw, t, tp, m)) for m in ("tp", "sp", "overlap")}
            for t in args.tokens}, "sp_threshold": sp_threshold(cfg, hw, tp)}, indent=2))
    else:
        print(plan_table(cfg, hw, tp, args.tokens))
    return 0


def _model_config(model: str) -> ModelConfig:
    from seqpar_bench.catalog import SYNTHETIC, resolve
    from seqpar_bench.public import PUBLIC_CONFIGS
    if model in PUBLIC_CONFIGS:
        return ModelConfig.from_hf(PUBLIC_CONFIGS[model], source=model)
    if model in SYNTHETIC:
        return ModelConfig.from_hf({"model_type": "llama", **SYNTHETIC[model]}, source=model)
    if model.endswith(".json") and os.path.isfile(model):
        return ModelConfig.from_hf(json.load(open(model)), source=model)
    return ModelConfig.from_dir(resolve(model))


if __name__ == "__main__":
    sys.exit(main())
