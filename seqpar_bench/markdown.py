"""docs/benchmarks.md from one bench result. A block between NOTES_BEGIN and NOTES_END in the
existing file (the hand-written reading of the numbers) is kept across regenerations."""
from __future__ import annotations

import re
from pathlib import Path

from seqpar_bench import results
from seqpar_bench.costmodel import PROFILES, layer_cost, load_profile, overlap_gain, sp_threshold
from seqpar_bench.public import PUBLIC_CONFIGS
from seqpar_bench.record import Record
from seqpar.config import ModelConfig

NOTES_BEGIN, NOTES_END = "<!-- notes: kept when regenerated -->", "<!-- end of notes -->"
ENGINE_BEGIN = "<!-- engine bench: kept when regenerated -->"
ENGINE_END = "<!-- end of engine bench -->"
"""`seqpar bench engine`'s section (engine.py writes it), kept at the end of the page."""
MiB = 2 ** 20


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> list[str]:
    return [_row(head), _row(["---"] * len(head))] + [_row(r) for r in rows]


def _x(v, fmt=".3f"):
    return "-" if v is None else format(v, fmt)


def gpu_predictions() -> list[str]:
    """Best-case overlap gains and SP thresholds on GPU nodes, next to published results."""
    lines = []
    rows = []
    for model in ("llama-3-8b", "llama-3-70b"):
        cfg = ModelConfig.from_hf(PUBLIC_CONFIGS[model], source=model)
        for hw_name in ("h100-sxm-nvlink", "a100-sxm-nvlink"):
            hw = PROFILES[hw_name]
            for tp in (8,):
                for t in (2048, 8192, 32768):
                    tp_c = layer_cost(cfg, hw, t, tp, "tp")
                    sp_c = layer_cost(cfg, hw, t, tp, "sp")
                    ov_c = layer_cost(cfg, hw, t, tp, "overlap")
                    rows.append([model, hw_name, tp, t,
                                 f"{tp_c.total * 1e6:.0f}",
                                 f"{tp_c.comm / tp_c.total:.0%}",
                                 f"{tp_c.total / sp_c.total:.3f}",
                                 f"{overlap_gain(cfg, hw, t, tp):.3f}",
                                 f"{tp_c.total / ov_c.total:.3f}",
                                 sp_threshold(cfg, hw, tp) or "never"])
    lines += _table(["model", "hardware", "tp", "tokens", "TP layer us", "comm share (TP)",
                     "SP / TP speedup", "overlap / SP (best)", "SP+overlap / TP", "SP threshold"],
                    rows)
    return lines


def overlap_section(recs: list[Record], mach: dict) -> list[str]:
    """Where an SP prefill step's time goes at tp > 1, and how much of its communication the
    collective matmuls hide."""
    rows = results.overlap_rows(recs)
    if not rows:
        return []
    computing = mach["threads_total"]
    return ["", "## Overlap: communication hidden", "",
            "`comm alone`: the wall time of exactly the collectives one SP prefill step issues "
            "(`analytic.step_collectives`: 2L + 1 reduce-scatters and 2L all-gathers of "
            "[T_pad, H], the sampled rows' all-gather and the logits' gather; the same shapes, "
            "count and dtype, on the same ranks and backend), run back to back with no compute "
            "(`LLM.time_collectives`), timed right after each sp=on run. `compute alone` = sp=on "
            "- comm alone. `hidden` = (sp=on - overlap) / comm alone, from medians: the share of "
            "the communication time the ring collective matmuls take off the step. "
            "`cores busy in comm`: CPU-seconds all ranks spent in comm alone per second of it "
            "(on CPU every transfer is a copy the cores make, whatever the transport).",
            "",
            f"Overlap can at best take a step down to max(compute alone, comm alone), and only "
            f"with cores free for the transfers while the matmuls run: here the ranks compute "
            f"with {computing} thread(s) in all on {mach['cores']} cores, so "
            f"{max(0, mach['cores'] - computing)} core(s) are left for moving bytes meanwhile.",
            ""] + _table(results.OVERLAP_HEAD, rows)


def pipeline_section(recs: list[Record], mach: dict) -> list[str]:
    """pp=2 against one stage at the same tp, and the bytes that cross the stage boundary."""
    rows = results.pipeline_rows(recs, mach["cores"])
    if not rows:
        return []
    return ["", "## Pipeline parallelism", "",
            "Two stages of tp ranks each (`pipeline_parallel_size=2`) against one stage at the "
            "same tp: `x pp=1` compares pp=2 with sp=off and pp=2+sp with sp=on (prefill: pair "
            "by pair; decode: a ratio of medians), so below 1 the pipeline is faster. Every mode "
            "has the same threads in total: a rank of tp x pp gets threads / (tp x pp), at least "
            "1. Prefill is one sequence, which the stages run one after the other, so tp ranks "
            "work at a time even where tp x pp exceeds the machine's "
            f"{mach['cores']} cores (marked). Decode keeps one step in flight per stage, each "
            "with its share of the batch, so all tp x pp ranks work at once: it runs only where "
            "they fit the cores (the notes above name what was left out).", "",
            "Boundary bytes per step, all ranks: `comm_stats()` send bytes less the sampled rows' "
            "float32 logits the last stage sends rank 0, against `analytic.boundary_bytes`: every "
            "TP rank sends the next stage the hidden state and the residual, [T, H] each on a TP "
            "step, its [T_pad / tp, H] shard of each on an SP step (1/tp of TP).", ""] + _table(
        results.PIPELINE_HEAD, rows)


def write(result: dict, path, plots_dir=None) -> None:
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    m = re.search(re.escape(NOTES_BEGIN) + r".*?" + re.escape(NOTES_END), old, re.S)
    notes = m.group(0) if m else f"{NOTES_BEGIN}\n(no notes yet)\n{NOTES_END}"
    recs, mach = result["records"], result["machine"]
    rel = ""
    if plots_dir:
        try:
            rel = str(Path(plots_dir).resolve().relative_to(path.parent.resolve()))
            rel = "" if rel == "." else rel + "/"
        except ValueError:
            rel = str(Path(plots_dir).resolve()) + "/"
    L = ["# Benchmarks", "",
         "Generated by `seqpar bench`; regenerate every number, table and plot on this page with",
         "", "```", "make bench      # = seqpar bench --docs", "```", "",
         f"This run: `{result['command']}`, {mach['wall_s'] / 60:.0f} minutes.", "",
         f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, transformers "
         f"{mach['transformers']}, backend {mach['backend']}, fp32. Every mode gets the same "
         f"{mach['threads_total']} threads in total (a tp-rank process gets threads / tp).",
         f"Other processes used {mach['other_share']:.0%} of the CPUs while it ran "
         f"({mach['other_cpu_s']:.0f} CPU-seconds; load average before "
         f"{mach['load_avg_before'][0]}). "
         + ("Other jobs shared the machine: absolute times are inflated and noisier than on an "
            "idle machine; interleaving keeps the ratios fair." if mach["other_share"] > 0.05
            else "The machine was otherwise idle."), ""]
    models = sorted({(r.model, r.model_desc) for r in recs})
    L += ["Models: " + "; ".join(f"`{name}` = {desc}" for name, desc in models) + ".", ""]
    for note in result.get("notes", []):
        L.append(f"- {note}")
    s = result["settings"]
    L += ["", f"Settings: {s['runs']} measured runs per point after {s['warmup']} warm-up, modes "
          f"interleaved round by round (order rotating); median, min and max; ratios to sp=off "
          f"are medians of run-by-run ratios. Decode: {s['prompt_len']}-token prompts, "
          f"{s['new_tokens']} new tokens, time of the {s['new_tokens'] - 1} decode steps "
          "(a 1-token generate subtracted).", ""]
    L += ["## Targets", ""]
    L += _table(["target", "status", "numbers"], results.targets(recs))
    L += ["", notes, ""]

    L += ["## Prefill latency", "",
          "One sequence of `tokens` tokens, one sampled row (HF and DTensor: `logits_to_keep=1`). "
          "`model s`: the cost model's prediction from the CPU profile (seqpar only).", ""]
    rows = [[r.model, r.tp, r.tokens, r.mode, f"{r.median_s:.4f}",
             f"{r.min_s:.4f}", f"{r.max_s:.4f}", _x(r.ratio_vs_sp_off),
             f"{r.tokens_per_s:.0f}", _x(r.predicted_s, ".4f")]
            for r in recs if r.scenario == "prefill" and r.pp == 1]
    L += _table(["model", "tp", "tokens", "mode", "median s", "min s", "max s", "x sp=off",
                 "tok/s", "model s"], rows)
    L += ["", f"![prefill latency]({rel}bench_latency.png)", ""]

    L += ["## Decode throughput", ""]
    rows = [[r.model, r.tp, r.batch, r.mode, f"{r.median_s:.4f}",
             f"{r.min_s:.4f}", f"{r.max_s:.4f}", _x(r.ratio_vs_sp_off),
             f"{r.tokens_per_s:.1f}"] for r in recs
            if r.scenario == "decode" and r.pp == 1]
    L += _table(["model", "tp", "batch", "mode", "decode s", "min s", "max s", "x sp=off",
                 "tok/s"], rows)

    L += ["", "## Peak activation memory per rank", "",
          "Measured by seqpar's probe (`LLM.profile_memory`; for HF and DTensor the same probe "
          "around the forward): the most bytes the step's own allocations hold at once, weights "
          "excluded, after a warm-up at the same token count (so seqpar's KV cache already has "
          "its room and is not counted; HF's and DTensor's forwards allocate theirs). On CPU the "
          "probe reads glibc's count of bytes in use (every thread's allocations and frees, gloo's "
          "included) after each aten op.", "",
          "Prediction (`seqpar_bench/analytic.py`): the peak falls in an MLP: residual stream and "
          "norm output `2 x rows x H` (rows = T under TP, T/N under SP: what SP shrinks) + the MLP "
          "transient `T x (2I/N + H)` (gate_up with silu(gate) * up written over gate, next to "
          "the gathered input under SP or the down projection's output), the same in both "
          "modes.", ""]
    rows = []
    for r in recs:
        if r.scenario != "prefill" or not r.peak_bytes:
            continue
        p = r.peak_bytes_predicted
        meas = " / ".join(f"{b / MiB:.1f}" for b in r.peak_bytes)
        rows.append([r.model, r.tp, r.tokens, r.mode, meas,
                     "-" if not p else f"{p['total'] / MiB:.1f}",
                     "-" if not p else f"{p['stream'] / MiB:.1f} + {p['mlp'] / MiB:.1f}",
                     "-" if not p else f"{max(r.peak_bytes) / p['total'] - 1:+.1%}"])
    L += _table(["model", "tp", "tokens", "mode", "measured MiB per rank", "predicted MiB",
                 "stream + MLP", "error (largest rank)"], rows)
    L += ["", f"![peak memory]({rel}bench_memory.png)", ""]

    L += ["## Communication per step", "",
          "Logical bytes as `LLM.comm_stats()` counts them (the whole tensor of each collective) "
          "against the minimum the layout needs (`analytic.comm_minimum`): 2L + 1 reductions of "
          "[T, H] (2 per layer, 1 for the vocab-parallel embedding): all-reduces on TP steps; "
          "reduce-scatters of [T_pad, H] plus 2L all-gathers of [T_pad, H] and one of the sampled "
          "rows on SP steps; and one gather of the sampled rows' vocab-parallel logits. With ring "
          "algorithms every rank sends the same bytes either way (`wire_bytes_per_rank`).", ""]
    rows = [[r.scenario, r.model, r.tp, r.tokens, r.mode,
             "SP" if r.sp_step else "TP", f"{r.comm_bytes / 1e6:.3f}",
             f"{r.comm_min_bytes / 1e6:.3f}", _x(r.comm_ratio, ".2f")]
            for r in recs if r.comm_ratio is not None]
    L += _table(["scenario", "model", "tp", "tokens/step", "mode", "step ran", "MB per step",
                 "minimum MB", "ratio"], rows)
    if result.get("sp_thresholds"):
        L += ["", "SP thresholds measured at start-up by `sp=auto`: " + ", ".join(
            f"{k}: {v} tokens" for k, v in result["sp_thresholds"].items()) + "."]
    L += overlap_section(recs, mach)
    L += pipeline_section(recs, mach)

    L += ["", "## Cost model (`seqpar plan`)", "",
          "`seqpar plan --model M -tp N --hardware H` predicts each decoder layer's matmul, "
          "attention, token-wise, overhead and communication time under TP, SP and SP + overlap "
          "(best case), the SP token threshold and the overlap gain, from a hardware profile "
          "(`seqpar_bench/costmodel.py`). `seqpar plan --calibrate -tp 2 --out FILE` measures "
          "this machine's profile.", ""]
    hw_name = s.get("hardware")
    if hw_name:
        hw = load_profile(hw_name)
        L += [f"CPU profile `{hw.name}` ({hw.source}): matmul {hw.matmul_flops / 1e9:.1f} GFLOP/s, "
              f"attention {hw.attention_flops / 1e9:.1f} GFLOP/s, memory "
              f"{hw.mem_bw / 1e9:.1f} GB/s, per-op overhead {hw.op_overhead * 1e6:.1f} us, "
              "collectives (latency, bandwidth): " + ", ".join(
                  f"{op} {a * 1e6:.0f} us, {b / 1e9:.2f} GB/s" for op, (a, b) in hw.collectives.items())
              + ".", ""]
        rows = [[r.model, r.tp, r.tokens, r.mode, f"{r.median_s:.4f}",
                 f"{r.predicted_s:.4f}", f"{r.predicted_s / r.median_s - 1:+.0%}"]
                for r in recs if r.predicted_s]
        L += _table(["model", "tp", "tokens", "mode", "measured s", "predicted s", "error"], rows)
    L += ["", "GPU nodes, from public specs (profiles in `costmodel.PROFILES`; per-layer forward, "
          "one sequence of `tokens` tokens, bf16):", ""]
    L += gpu_predictions()
    L += ["", "Published results to compare with: PyTorch / torchtitan asynchronous TP reports "
          "about 1.09-1.10x end-to-end training speedup on Llama-3 8B and 70B on H100 nodes; vLLM "
          "reports up to ~10% from sequence parallelism + async TP at large token counts. The "
          "'SP+overlap / TP' column is the comparable number: a best case for the decoder layers "
          "alone (end to end adds the LM head, sampling or the optimizer, which do not speed up)."]
    engine = re.search(re.escape(ENGINE_BEGIN) + r".*?" + re.escape(ENGINE_END), old, re.S)
    if engine:
        L += ["", engine.group(0)]
    path.write_text("\n".join(L) + "\n")
