"""`seqpar bench`: prefill latency and decode throughput of seqpar's modes next to HF transformers
and PyTorch DTensor TP+SP, interleaved in one run; peak memory, communication bytes against the
analytic minimum, and the cost model's prediction. `seqpar plan` is the cost model (costplan.py).
Modules: suite (runs the modes), catalog (which models), results (tables, plots, targets),
markdown (the results page). `seqpar bench engine` (engine.py): the serving engine core against
HF, the machine's bandwidth and matmul rate, prefix-cache TTFT and the KV formula (issue 11), with
llama.cpp and vLLM's CPU engine as peers in processes of their own (peers.py); `seqpar bench serve`
(serve.py): `seqpar serve` over HTTP; `seqpar bench spec` (spec.py): speculative decoding off /
n-gram / draft at batch 1; `seqpar bench gpu-check` (gpu_check.py): the CUDA smoke checks.

A package beside the engine, not inside it: nothing in `seqpar` imports it (`seqpar bench` and
`seqpar plan` import it on use). It drives the engine through LLM / SamplingParams / EngineArgs'
fields, their documented stats (comm_stats, cache_stats, weight_stats) and the server's HTTP API;
besides those it reads only PUBLIC_MODULES (tests/test_bench.py checks every import). kernels/ is
the exception by design: micro-benchmarks of one internal kernel."""
from __future__ import annotations

import argparse
import json
import os
import sys

from seqpar_bench.record import Record
from seqpar_bench.suite import MODES, Settings, run

PUBLIC_MODULES = ("seqpar", "seqpar.engine.args", "seqpar.config", "seqpar.loader.resolve",
                  "seqpar.distributed.launch", "seqpar.worker.memory", "seqpar.distributed.comm")
"""The seqpar modules this package may import: the API (LLM, SamplingParams, EngineArgs), the model
config and name resolution (what a model is), process helpers (free port, spawn), the peak-memory
probe, and Comm, which only `seqpar plan --calibrate` uses to time the engine's own collectives."""

DEFAULT_GROUPS = (("smollm2", 1), ("smollm2-8h", 2))
"""Without --model / -tp: SmolLM2's real weights at tp=1 (vs HF), its 8-head twin at tp=2."""
FULL = dict(tokens=[128, 512, 2048, 8192], batches=[1, 16], prompt_len=128, new_tokens=32,
            runs=5, warmup=1, memory_runs=3, pp_tokens=[512], pp_batches=[16])
QUICK = dict(tokens=[64, 256], batches=[1, 16], prompt_len=16, new_tokens=4, runs=2, warmup=1,
             memory_runs=1, pp_tokens=[256], pp_batches=[16])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench", description=__doc__)
    p.add_argument("--model", nargs="+", default=None,
                   help="models (seqpar --model forms, or smollm2-8h); default: smollm2 at tp 1 "
                        "and its 8-head twin smollm2-8h at tp 2")
    p.add_argument("-tp", "--tensor-parallel-size", dest="tp", type=int, nargs="+", default=None,
                   help="tp sizes, run for every model they fit (default: see --model)")
    p.add_argument("--modes", nargs="+", default=None, choices=[m.name for m in MODES],
                   help="modes (default: "
                        f"{', '.join(m.name for m in MODES if m.default)})")
    p.add_argument("--quick", action="store_true",
                   help="small token counts and fewer runs: a few minutes, table only")
    p.add_argument("--tokens", type=int, nargs="+", help="prefill token counts "
                   f"(default {FULL['tokens']}, quick {QUICK['tokens']})")
    p.add_argument("--batches", type=int, nargs="*", help="decode batch sizes (default 1 16)")
    p.add_argument("--pp-tokens", type=int, nargs="*",
                   help="prefill token counts of the pipeline modes (pp=2 ...), next to their "
                        f"one-stage modes (default {FULL['pp_tokens']}, "
                        f"quick {QUICK['pp_tokens']})")
    p.add_argument("--pp-batches", type=int, nargs="*",
                   help=f"decode batch sizes of the pipeline modes (default {FULL['pp_batches']})")
    p.add_argument("--prompt-len", type=int, help="decode prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, help="tokens generated per sequence when decoding")
    p.add_argument("--runs", type=int, help="measured runs per point (default 5, quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up runs per point, discarded (default 1)")
    p.add_argument("--memory-runs", type=int,
                   help="peak-memory probes per point, smallest kept (default 3, quick 1; 0: skip)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="total torch threads per mode: tp ranks get threads / tp each, HF all")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--hardware", default="cpu-2core-gloo",
                   help="cost-model profile to predict seqpar prefill times with ('' for none)")
    p.add_argument("--json", metavar="FILE", help="write every record (and the machine) as JSON")
    p.add_argument("--plots", metavar="DIR", help="write bench_latency.png and bench_memory.png")
    p.add_argument("--markdown", metavar="FILE", help="write the results page (docs/benchmarks.md)")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="add the records of earlier --json files to this run's outputs")
    p.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                   help="run nothing: write the table, plots and page from earlier --json files")
    p.add_argument("--docs", action="store_true",
                   help="= --json docs/benchmarks.json --plots docs --markdown docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.docs:
        args.json = args.json or "docs/benchmarks.json"
        args.plots = args.plots or "docs"
        args.markdown = args.markdown or "docs/benchmarks.md"
    return args


def settings_for(args, log=print) -> list[Settings]:
    """One Settings per group of models x tp sizes, the presets filled in where args has None."""
    preset = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    modes = [m for m in MODES if (m.default if args.modes is None else m.name in args.modes)]
    if args.model is None and args.tp is None:
        groups = [([m], [tp]) for m, tp in DEFAULT_GROUPS]
    else:
        groups = [(args.model or ["smollm2"], args.tp or [1])]
    common = dict(modes=modes, tokens=pick("tokens"), batches=pick("batches"),
                  pp_tokens=pick("pp_tokens"), pp_batches=pick("pp_batches"),
                  prompt_len=pick("prompt_len"), new_tokens=pick("new_tokens"), runs=pick("runs"),
                  warmup=pick("warmup"), memory_runs=pick("memory_runs"), threads=args.threads,
                  dtype=args.dtype, seed=args.seed, hardware=args.hardware or None, log=log)
    return [Settings(models=ms, tps=tps, **common) for ms, tps in groups]


def _load(path: str) -> dict:
    """An earlier run's --json output, its records as Records."""
    with open(path) as f:
        result = json.load(f)
    result["records"] = [Record.from_dict(r) for r in result["records"]]
    return result


def main(argv=None) -> int:
    from seqpar_bench import results
    if argv and argv[0] == "engine":  # its own modes with their own flags
        from seqpar_bench.engine import main as engine_main
        return engine_main(argv[1:])
    if argv and argv[0] == "serve":
        from seqpar_bench.serve import main as serve_main
        return serve_main(argv[1:])
    if argv and argv[0] == "spec":
        from seqpar_bench.spec import main as spec_main
        return spec_main(argv[1:])
    if argv and argv[0] == "gpu-check":
        from seqpar_bench.gpu_check import main as gpu_check_main
        return gpu_check_main(argv[1:])
    args = parse(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory probe's profiler: quiet
    runs = settings_for(args)
    result = None
    if args.replot:
        result = _load(args.replot[0])
        args.merge = args.replot[1:] + args.merge
        runs = []
    for s in runs:
        part = run(s)
        if result is None:
            result = part
        else:
            result["records"] += part["records"]
            result["notes"] += part["notes"]
            result["sp_thresholds"].update(part["sp_thresholds"])
            for k in ("wall_s", "other_cpu_s"):
                result["machine"][k] += part["machine"][k]
            result["machine"]["other_share"] = max(result["machine"]["other_share"],
                                                   part["machine"]["other_share"])
            result["machine"]["load_avg_after"] = part["machine"]["load_avg_after"]
    for path in args.merge:
        earlier = _load(path)
        result["records"] += earlier["records"]
        result["notes"] += earlier.get("notes", []) + [
            f"records from `{earlier.get('command', path)}` merged in ({path}); that run: "
            f"{earlier['machine']['wall_s'] / 60:.0f} min, other processes used "
            f"{earlier['machine']['other_share']:.0%} of the CPUs"]
    if runs:
        command = "seqpar bench " + " ".join(argv if argv is not None else sys.argv[1:])
        result["command"] = command.strip()
        result["settings"] = {k: v for k, v in runs[0].__dict__.items() if k not in ("log", "modes")}
        result["settings"]["modes"] = [m.name for m in runs[0].modes]
    records = result["records"]
    if args.hardware:
        from seqpar_bench.suite import add_predictions
        add_predictions(records, args.hardware)
    print()
    print(results.table(records))
    for extra in (results.overlap_table(records),
                  results.pipeline_table(records, result["machine"]["cores"])):
        if extra:
            print("\n" + extra)
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['backend']}; "
          f"{m['wall_s']:.0f} s; other processes used {m['other_share']:.0%} of the CPUs meanwhile")
    for name, status, nums in results.targets(records):
        print(f"[{status}] {name}: {nums}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "records": [r.to_dict() for r in records]}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plots:
        for path in results.plots(records, args.plots):
            print(f"wrote {path}")
    if args.markdown:
        from seqpar_bench.markdown import write
        write(result, args.markdown, plots_dir=args.plots)
        print(f"wrote {args.markdown}")
    return 0
