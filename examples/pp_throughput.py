"""Pipeline parallelism: generation throughput at pp=2 against pp=1, and the stage-boundary bytes.

    .venv/bin/python examples/pp_throughput.py [--model smollm2] [-tp 1] [--sp off|on]
        [--prompts 16] [--prompt-len 32] [--max-tokens 16] [--max-batched-tokens 4096] [--rounds 3]

A batch of equal-length random prompts, greedy, EOS ignored. Each round starts every configuration
in turn (so background load hits them alike), runs one warm-up call and one timed call; the median
over rounds is reported. Throughput: generated tokens per second of the whole call (prefill
included). Configurations: one stage with 1 thread, one stage with pp threads (the fair baseline
when the stages share the machine's cores), pp stages with 1 thread per rank, with one step in
flight and with pp (the default). Bytes: the stage-boundary activations, and apart the sampled
rows' logits going from the last stage to rank 0.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from seqpar import LLM, SamplingParams


def run_once(model, tp, pp, threads, in_flight, sp, budget, prompts, params):
    if tp * pp == 1:
        torch.set_num_threads(threads)  # a single rank runs in this process
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, sequence_parallel=sp,
             threads_per_rank=threads, max_num_batched_tokens=budget) as llm:
        llm._max_in_flight = in_flight
        vocab = llm.cfg.model.vocab_size
        llm.generate(prompts, params)  # warm-up
        llm.reset_comm_stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        stats = llm.comm_stats()
    tokens = sum(len(o.token_ids) for o in outs)
    stats["logits_bytes"] = tokens * vocab * 4  # one float32 row per generated token
    return tokens / seconds, stats, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-tp", type=int, default=1)
    ap.add_argument("-pp", type=int, default=2)
    ap.add_argument("--sp", default="off", choices=["off", "on"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=4096,
                    help="tokens per step; smaller chunks long prompts into more steps")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    # (pp, threads per rank, steps in flight)
    configs = [(1, 1, 1), (1, args.pp, 1), (args.pp, 1, 1), (args.pp, 1, args.pp)]
    rates = {c: [] for c in configs}
    last = {}
    for _ in range(args.rounds):
        for config in configs:
            rate, stats, tokens = run_once(args.model, args.tp, *config, args.sp, args.max_batched_tokens,
                                           prompts, params)
            rates[config].append(rate)
            last[config] = (stats, tokens)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.model}, "
          f"{args.prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} generated each, "
          f"<= {args.max_batched_tokens} tokens per step, tp={args.tp} sp={args.sp}, "
          f"median of {args.rounds} rounds")
    reference = last[configs[0]][1]
    for config in configs:
        pp, threads, in_flight = config
        stats, tokens = last[config]
        steps = stats["steps"]["sp"] + stats["steps"]["tp"]
        send = stats["send"]
        boundary = send["bytes"] - (stats["logits_bytes"] if pp > 1 else 0)
        print(f"pp={pp} threads/rank={threads} in flight={in_flight}: "
              f"{statistics.median(rates[config]):7.1f} tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r in rates[config])}), {steps} steps, "
              f"{send['calls']} sends: boundary {boundary / 1e6:.2f} MB, "
              f"logits {send['bytes'] / 1e6 - boundary / 1e6:.2f} MB"
              f"{'' if tokens == reference else ', TOKENS DIFFER'}")
    med = {c: statistics.median(r) for c, r in rates.items()}
    print(f"pp={args.pp} vs pp=1: {med[configs[3]] / med[configs[0]]:.2f}x (1 thread per rank), "
          f"{med[configs[3]] / med[configs[1]]:.2f}x (one rank with {args.pp} threads); "
          f"{args.pp} steps in flight vs 1: {med[configs[3]] / med[configs[2]]:.2f}x")


if __name__ == "__main__":
    main()
