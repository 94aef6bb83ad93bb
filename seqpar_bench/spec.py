"""`seqpar bench spec`: batch-1 decode tok/s with speculative decoding off, n-gram and a draft
model, on a repetitive prompt (a passage pasted several times, then its start: greedy decoding
goes on copying it, where prompt lookup pays) and on random-token prompts (where it should back
off), with the mean acceptance length and, with tp > 1, how many verification steps the per-step
SP policy ran sequence-parallel (issue 22).

Each configuration has an LLM of its own, all loaded at once at tp=1 (one process holds one
multi-rank LLM at a time, so at tp > 1 each starts afresh in its turn); rounds alternate between
them (the order rotating), so drifts of a shared machine hit every configuration alike. Decode time of a
request = wall time of generate(max_tokens=N) minus that of generate(max_tokens=1) on the same
prompt (the prefill, served by the prefix cache after the first round in both); tok/s =
(N - 1) / decode time, best and median over the rounds after the warm-up.

The draft defaults to the target itself (SmolLM2 drafting for SmolLM2): a smoke test of the draft
path (every draft accepted, each draft step as dear as a target step), not a useful draft.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from seqpar import LLM, SamplingParams
from seqpar_bench.engine import cpu_flags

PASSAGE = ("The river rises in the hills above the town and runs south through the old mill "
           "district, where the stone bridges still carry the market road. In spring the water "
           "climbs over the lower steps and the ferrymen wait for the level to fall before they "
           "cross. ")


def prompts(llm: LLM, random_len: int, count: int, seed: int) -> dict[str, list[list[int]]]:
    """{"repetitive": [ids], "random": [ids, ...]}. A model without a tokenizer (the bench's
    random ones) repeats a random 48-token passage instead."""
    rng = random.Random(seed)
    vocab = llm.cfg.model.vocab_size
    if llm.tokenizer is not None:
        repetitive = llm.encode(PASSAGE * 4 + PASSAGE[:60])
    else:
        passage = [rng.randrange(vocab) for _ in range(48)]
        repetitive = passage * 4 + passage[:12]
    return {"repetitive": [repetitive],
            "random": [[rng.randrange(vocab) for _ in range(random_len)] for _ in range(count)]}


def time_generate(llm: LLM, prompt: list[int], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], params)
    return time.perf_counter() - t0


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench spec", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--draft", default=None, help="draft model (default: the target itself, a "
                   "smoke test only)")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds (>= 1: the first "
                   "round fills the prefix cache)")
    p.add_argument("--random-prompts", type=int, default=2)
    p.add_argument("--random-len", type=int, default=64)
    p.add_argument("--configs", default="off,ngram,draft")
    p.add_argument("--threads", type=int, default=None, help="threads_per_rank")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("--sp", default="auto", choices=["off", "on", "auto"],
                   help="sequence_parallel of every configuration (run auto, then off, to see "
                   "what SP on verification steps saves)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def spec_configs(args) -> dict[str, dict | None]:
    k = args.num_speculative_tokens
    every = {"off": None,
             "ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                       "prompt_lookup_max": 4},
             "draft": {"model": args.draft or args.model, "num_speculative_tokens": k}}
    return {name: every[name] for name in args.configs.split(",")}


def run(args) -> dict:
    if args.warmup < 1 or args.rounds < 1:
        raise ValueError("--warmup and --rounds must be >= 1 (the first round fills the prefix "
                         "cache: its prefill times differ)")
    configs = spec_configs(args)

    def start(name: str) -> LLM:
        return LLM(args.model, speculative_config=configs[name], threads_per_rank=args.threads,
                   max_model_len=1024, tensor_parallel_size=args.tensor_parallel_size,
                   sequence_parallel=args.sp)

    # One process holds one multi-rank LLM at a time: with tp > 1 each configuration starts
    # afresh in its turn of every round (its prompts' prefixes cached first, untimed).
    resident = args.tensor_parallel_size == 1
    llms = {name: start(name) for name in configs} if resident else {}
    names = list(configs)
    times, stats = {}, {}
    try:
        first = llms[names[0]] if resident else start(names[0])
        work = prompts(first, args.random_len, args.random_prompts, 0)
        if not resident:
            first.close()
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                llm = llms[name] if resident else start(name)
                try:
                    if not resident:
                        for prompt in (p for batch in work.values() for p in batch):
                            time_generate(llm, prompt, 1)
                    for kind, batch in work.items():
                        before, steps = llm.spec_stats(), llm.comm_stats()["steps"]
                        decode = 0.0
                        for prompt in batch:
                            decode += (time_generate(llm, prompt, args.tokens)
                                       - time_generate(llm, prompt, 1))
                        if r < args.warmup:
                            continue
                        times.setdefault((name, kind), []).append(
                            len(batch) * (args.tokens - 1) / decode)
                        after, now = llm.spec_stats(), llm.comm_stats()["steps"]
                        acc = stats.setdefault((name, kind), [0, 0, 0, 0, 0])
                        acc[0] += after["num_drafts"] - before["num_drafts"]
                        acc[1] += after["num_draft_tokens"] - before["num_draft_tokens"]
                        acc[2] += after["num_accepted_tokens"] - before["num_accepted_tokens"]
                        acc[3] += now["sp_verify"] - steps["sp_verify"]
                        acc[4] += now["tp_verify"] - steps["tp_verify"]
                finally:
                    if not resident:
                        llm.close()
    finally:
        for llm in llms.values():
            llm.close()
    rows = []
    for (name, kind), rates in times.items():
        drafts, proposed, accepted, sp_steps, tp_steps = stats.get((name, kind), (0,) * 5)
        base = times["off", kind] if "off" in configs else None
        rows.append({"config": name, "workload": kind, "tok_s_best": max(rates),
                     "tok_s_median": statistics.median(rates),
                     "x_off_best": None if base is None else max(rates) / max(base),
                     "verifications": drafts, "draft_tokens": proposed,
                     "accepted_tokens": accepted,
                     "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
                     "verify_steps_sp": sp_steps, "verify_steps_tp": tp_steps})
    return {"model": args.model, "draft": args.draft or f"{args.model} (itself: smoke test)",
            "k": args.num_speculative_tokens, "new_tokens": args.tokens, "rounds": args.rounds,
            "tensor_parallel_size": args.tensor_parallel_size, "sequence_parallel": args.sp,
            "cpu_flags": cpu_flags(), "rows": rows}


def main(argv=None) -> int:
    args = parse(argv)
    result = run(args)
    print(f"{'config':8} {'workload':11} {'tok/s best':>10} {'median':>8} {'x off':>6} "
          f"{'accept len':>10} {'SP / TP verify steps':>20}")
    for row in result["rows"]:
        ratio = "" if row["x_off_best"] is None else f"{row['x_off_best']:.2f}"
        length = row["mean_acceptance_length"]
        print(f"{row['config']:8} {row['workload']:11} {row['tok_s_best']:10.1f} "
              f"{row['tok_s_median']:8.1f} {ratio:>6} "
              f"{'' if length is None else f'{length:.2f}':>10} "
              f"{row['verify_steps_sp']:>9} / {row['verify_steps_tp']:<9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
