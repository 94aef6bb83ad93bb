"""`python -m seqpar_bench.moe`: an MoE model (random smollm2-moe by default) at tp=2 as TP, SP and
SP + expert parallelism: prefill latency, decode throughput, logical bytes of one prefill step
against the analytic minimum, and peak activation memory per rank.

TP and SP share one LLM (the mode is switched per call, rounds interleaved); SP + EP needs its own
(expert parallelism is fixed at start-up), run after. Fixed prompts, warm-up excluded, the minimum
and the median of the rounds reported, one JSON record per mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from seqpar import LLM, SamplingParams
from seqpar_bench import analytic
from seqpar_bench.catalog import resolve

MODES = {"tp": ("off", False), "sp": ("on", False), "sp+ep": ("on", True)}


def measure(llm: LLM, mode: str, args) -> dict:
    """One round of every measurement for `mode` on an open LLM."""
    llm.policy.mode = MODES[mode][0]
    prompt = [(7 * i) % 1000 + 3 for i in range(args.prefill)]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    llm.generate([prompt], one)
    prefill_s = time.perf_counter() - t0
    batch = [[(11 * i + b) % 1000 + 3 for i in range(8)] for b in range(args.batch)]
    new = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(batch, new)
    decode_tok_s = args.batch * args.new_tokens / (time.perf_counter() - t0)
    return {"prefill_s": prefill_s, "decode_tok_s": decode_tok_s}


def once(llm: LLM, mode: str, args) -> dict:
    """Bytes and peak memory of one prefill step (not timed)."""
    llm.policy.mode = MODES[mode][0]
    prompt = [(7 * i) % 1000 + 3 for i in range(args.prefill)]
    llm.reset_comm_stats()
    peaks = llm.profile_memory([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    stats = llm.comm_stats()
    measured = {op: v["bytes"] for op, v in stats.items() if op != "steps" and v["bytes"]}
    minimum = analytic.comm_minimum(llm.cfg.model, [args.prefill], args.tp, MODES[mode][0] == "on",
                                    llm.cfg.torch_dtype.itemsize)
    return {"comm_bytes": measured, "comm_min_bytes": minimum,
            "comm_ratio": sum(measured.values()) / max(1, sum(minimum.values())),
            "peak_bytes": peaks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar_bench.moe", description=__doc__)
    p.add_argument("--model", default="smollm2-moe", help="an MoE model (default: random smollm2-moe)")
    p.add_argument("-tp", "--tp", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens (one sequence)")
    p.add_argument("--batch", type=int, default=8, help="decode batch (8-token prompts)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per sequence")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    args = p.parse_args(argv)
    model_dir = resolve(args.model)
    records = []
    for ep, modes in ((False, ["tp", "sp"]), (True, ["sp+ep"])):
        with LLM(str(model_dir), tensor_parallel_size=args.tp, sequence_parallel="off",
                 dtype=args.dtype, max_num_batched_tokens=max(args.prefill, args.batch),
                 enable_prefix_caching=False, threads_per_rank=args.threads_per_rank,
                 enable_expert_parallel=ep) as llm:
            rounds = {m: [] for m in modes}
            for r in range(args.rounds + 1):  # round 0: warm-up
                for m in modes:
                    result = measure(llm, m, args)
                    if r:
                        rounds[m].append(result)
            for m in modes:
                prefill = [x["prefill_s"] for x in rounds[m]]
                decode = [x["decode_tok_s"] for x in rounds[m]]
                records.append({"mode": m, "tp": args.tp, "model": args.model, "dtype": args.dtype,
                                "prefill_tokens": args.prefill, "prefill_min_s": min(prefill),
                                "prefill_median_s": statistics.median(prefill),
                                "decode_batch": args.batch, "decode_max_tok_s": max(decode),
                                "decode_median_tok_s": statistics.median(decode),
                                **once(llm, m, args)})
    print(f"{'mode':<6} {'prefill min/med s':>18} {'decode max/med tok/s':>21} {'bytes/min':>9} "
          f"{'peak MiB/rank':>14}")
    for r in records:
        peaks = "/".join(f"{b / 2**20:.0f}" for b in r["peak_bytes"])
        print(f"{r['mode']:<6} {r['prefill_min_s']:>8.3f}/{r['prefill_median_s']:<9.3f} "
              f"{r['decode_max_tok_s']:>10.1f}/{r['decode_median_tok_s']:<10.1f} "
              f"{r['comm_ratio']:>9.2f} {peaks:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
