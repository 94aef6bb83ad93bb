"""Bench results out: the tables on screen, PNG plots, and the performance targets checked
(sp=auto never slower than TP, against DTensor and HF, memory, communication bytes, overlap,
pipeline boundary bytes, the cost model)."""
from __future__ import annotations

import statistics

from seqpar_bench.record import Record

MiB = 2 ** 20


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def table(records: list[Record]) -> str:
    head = (f"{'scenario':<8} {'model':<11} {'tp':>2} {'tokens':>6} {'mode':>11} {'median s':>9} "
            f"{'min s':>9} {'max s':>9} {'x sp=off':>8} {'tok/s':>9} {'peak MiB/rank':>15} "
            f"{'pred MiB':>8} {'comm/step MB':>12} {'min MB':>8} {'ratio':>5} {'model s':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        peak = r.peak_bytes
        peak = "/".join(f"{p / MiB:.1f}" for p in peak) if peak else "-"
        pred = r.peak_bytes_predicted
        comm = r.comm_bytes
        lines.append(
            f"{r.scenario:<8} {r.model[:11]:<11} {r.tp:>2} {r.tokens:>6} {r.mode:>11} "
            f"{r.median_s:>9.4f} {r.min_s:>9.4f} {r.max_s:>9.4f} "
            f"{_f(r.ratio_vs_sp_off, '8.3f'):>8} {r.tokens_per_s:>9.1f} {peak:>15} "
            f"{_f(pred and pred['total'] / MiB, '8.1f'):>8} {_f(comm and comm / 1e6, '12.3f'):>12} "
            f"{_f(r.comm_min_bytes and r.comm_min_bytes / 1e6, '8.3f'):>8} "
            f"{_f(r.comm_ratio, '5.2f'):>5} {_f(r.predicted_s, '8.4f'):>8}")
    return "\n".join(lines)


def overlap_rows(records: list[Record]) -> list[list[str]]:
    """Per overlap prefill record: where an SP step's time goes and how much overlap hides."""
    rows = []
    for r in records:
        if r.hidden_fraction is None:
            continue
        rows.append([r.model, str(r.tp), str(r.tokens), f"{r.sp_on_s:.4f}",
                     f"{r.median_s:.4f}", f"{r.comm_alone_s:.4f}",
                     f"{r.comm_alone_cpu_s / r.comm_alone_s:.2f}",
                     f"{r.compute_alone_s:.4f}", f"{r.hidden_fraction:.0%}",
                     _f(r.ratio_vs_sp_off, ".3f")])
    return rows


OVERLAP_HEAD = ["model", "tp", "tokens", "sp=on s", "overlap s", "comm alone s",
                "cores busy in comm", "compute alone s", "hidden", "overlap x sp=off"]


def pipeline_rows(records: list[Record], cores: int | None = None) -> list[list[str]]:
    """Per pipeline record: time against one stage, and the bytes crossing the stage boundary."""
    rows = []
    for r in records:
        if r.pp == 1:
            continue
        ranks = r.tp * r.pp
        rows.append([r.scenario, r.model, str(r.tp), str(r.pp),
                     f"{ranks}" + (f" > {cores} cores" if cores and ranks > cores else ""),
                     r.mode, str(r.tokens), f"{r.median_s:.4f}",
                     f"{r.tokens_per_s:.1f}", _f(r.ratio_vs_pp1, ".3f"),
                     "SP" if r.sp_step else "TP",
                     _f(r.boundary_bytes and r.boundary_bytes / 1e6, ".4f"),
                     _f(r.boundary_min_bytes and r.boundary_min_bytes / 1e6, ".4f"),
                     _f(r.boundary_ratio, ".2f")])
    return rows


PIPELINE_HEAD = ["scenario", "model", "tp", "pp", "ranks", "mode", "tokens/batch", "median s",
                 "tok/s", "x pp=1", "step ran", "boundary MB/step", "analytic MB", "ratio"]


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def overlap_table(records: list[Record]) -> str:
    """The hidden fraction on screen ('' without overlap records)."""
    rows = overlap_rows(records)
    return ("overlap: communication hidden = (sp=on - overlap) / comm alone; compute alone = "
            "sp=on - comm alone\n" + _text_table(OVERLAP_HEAD, rows)) if rows else ""


def pipeline_table(records: list[Record], cores: int | None = None) -> str:
    """The pipeline rows on screen ('' without them); x pp=1: against the same mode on one stage."""
    rows = pipeline_rows(records, cores)
    return ("pipeline: x pp=1 against the same SP setting on one stage; boundary bytes: what "
            "crosses the stage boundary per step, all ranks\n"
            + _text_table(PIPELINE_HEAD, rows)) if rows else ""


def _series(records, scenario):
    out: dict[str, list[Record]] = {}
    for r in records:
        if r.scenario == scenario and r.pp == 1:
            out.setdefault(f"{r.model} tp={r.tp} {r.mode}", []).append(r)
    return out


def plots(records: list[Record], outdir) -> list[str]:
    """bench_latency.png and bench_memory.png (prefill, per mode vs tokens) in outdir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    series = _series(records, "prefill")
    for what, fname, ylabel in (
            ("latency", "bench_latency.png", "prefill latency, median s (bars: min-max)"),
            ("memory", "bench_memory.png", "peak activation memory per rank, MiB (largest rank)")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r.tokens)
            x = [r.tokens for r in rs]
            if what == "latency":
                y = [r.median_s for r in rs]
                err = [[r.median_s - r.min_s for r in rs], [r.max_s - r.median_s for r in rs]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
            else:
                if not all(r.peak_bytes for r in rs):
                    continue
                ax.plot(x, [max(r.peak_bytes) / MiB for r in rs], marker="o", label=label)
                if rs[0].peak_bytes_predicted and rs[0].mode in ("sp=off", "sp=on"):
                    ax.plot(x, [r.peak_bytes_predicted["total"] / MiB for r in rs], ls=":",
                            color=ax.lines[-1].get_color(), label=f"{label} (predicted)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens (one sequence)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / fname, dpi=110)
        plt.close(fig)
        written.append(str(outdir / fname))
    return written


def _find(records, **kw) -> list[Record]:
    return [r for r in records if all(getattr(r, k) == v for k, v in kw.items())]


def _paired_speedup(a: Record, b: Record) -> float | None:
    """median over runs of b / a (how many times faster a is than b), runs paired by round."""
    ta, tb = a.times_s, b.times_s
    if len(ta) != len(tb):
        return None
    return statistics.median(y / x for x, y in zip(ta, tb))


def targets(records: list[Record]) -> list[tuple[str, str, str]]:
    """(target, met / missed / not measured, numbers) for each performance target."""
    out = []
    pre = [r for r in records if r.scenario == "prefill"]
    # 1. sp=auto never slower than sp=off (ratio <= 1.02)
    autos = [r for r in records if r.mode == "sp=auto" and r.ratio_vs_sp_off]
    if autos:
        worst = max(autos, key=lambda r: r.ratio_vs_sp_off)
        ok = worst.ratio_vs_sp_off <= 1.02
        nums = ", ".join(f"{r.scenario} {r.tokens}: {r.ratio_vs_sp_off:.3f}" for r in autos)
        out.append(("sp=auto / sp=off <= 1.02 at every size", "met" if ok else "missed", nums))
    else:
        out.append(("sp=auto / sp=off <= 1.02 at every size", "not measured", ""))
    # 2. seqpar TP+SP vs DTensor TP+SP at tp=2: >= 3x at 128, >= 1.2x at 2048
    for t, want in ((128, 3.0), (2048, 1.2)):
        on = _find(pre, mode="sp=on", tp=2, tokens=t)
        dt = _find(pre, mode="dtensor", tp=2, tokens=t)
        name = f"seqpar sp=on >= {want}x faster than DTensor TP+SP at {t} tokens, tp=2"
        if on and dt:
            sp = _paired_speedup(on[0], dt[0])
            out.append((name, "met" if sp >= want else "missed",
                        f"{sp:.2f}x ({on[0].median_s:.3f} s vs {dt[0].median_s:.3f} s, "
                        f"{on[0].model})"))
        else:
            out.append((name, "not measured", ""))
    # 3. tp=1 decode >= 2x HF tokens/s; prefill no slower
    dec = [(r, _find(records, scenario="decode", mode="hf", model=r.model, tokens=r.tokens))
           for r in records if r.scenario == "decode" and r.mode == "sp=off" and r.tp == 1]
    dec = [(r, h[0]) for r, h in dec if h]
    if dec:
        nums = ", ".join(f"batch {r.tokens}: {_paired_speedup(r, h):.2f}x "
                         f"({r.tokens_per_s:.1f} vs {h.tokens_per_s:.1f} tok/s)" for r, h in dec)
        ok = all(_paired_speedup(r, h) >= 2.0 for r, h in dec)
        out.append(("tp=1 decode >= 2x HF generate tokens/s", "met" if ok else "missed", nums))
    pf = [(r, _find(pre, mode="hf", model=r.model, tokens=r.tokens))
          for r in pre if r.mode == "sp=off" and r.tp == 1]
    pf = [(r, h[0]) for r, h in pf if h]
    if pf:
        nums = ", ".join(f"{r.tokens}: {_paired_speedup(r, h):.2f}x" for r, h in pf)
        ok = all(_paired_speedup(r, h) >= 1 / 1.02 for r, h in pf)
        out.append(("tp=1 prefill no slower than HF (speedup >= 0.98)", "met" if ok else "missed",
                    nums))
    # 4. memory at the largest size, tp=2: sp=on < sp=off, both within 10% of the prediction
    mem = [r for r in pre if r.tp == 2 and r.mode in ("sp=off", "sp=on")
           and r.peak_bytes and r.peak_bytes_predicted]
    if mem:
        t = max(r.tokens for r in mem)
        at = {r.mode: r for r in mem if r.tokens == t}
        if len(at) == 2:
            off, on = at["sp=off"], at["sp=on"]
            below = max(on.peak_bytes) < max(off.peak_bytes)
            errs = {k: max(r.peak_bytes) / r.peak_bytes_predicted["total"] - 1
                    for k, r in at.items()}
            within = all(abs(e) <= 0.10 for e in errs.values())
            nums = (f"{t} tokens: sp=off {max(off.peak_bytes) / MiB:.1f} MiB "
                    f"(predicted {off.peak_bytes_predicted['total'] / MiB:.1f}, "
                    f"{errs['sp=off']:+.1%}), sp=on {max(on.peak_bytes) / MiB:.1f} MiB "
                    f"(predicted {on.peak_bytes_predicted['total'] / MiB:.1f}, {errs['sp=on']:+.1%})")
            out.append((f"peak memory/rank at {t} tokens, tp=2: sp=on below sp=off",
                        "met" if below else "missed", nums))
            out.append((f"peak memory/rank at {t} tokens, tp=2: within 10% of the prediction",
                        "met" if within else "missed", nums))
    # 5. comm bytes == analytic minimum
    comm = [r for r in records if r.comm_ratio is not None]
    if comm:
        ratios = sorted({round(r.comm_ratio, 4) for r in comm})
        ok = all(abs(r.comm_ratio - 1) < 1e-9 for r in comm)
        out.append(("comm bytes per step / analytic minimum = 1.00", "met" if ok else "missed",
                    f"{len(comm)} records, ratios {ratios}"))
    # overlap at >= 2048 tokens, tp=2: hides >= 50% of the communication, and
    # sp+overlap <= 0.9 x sp=off
    big = [r for r in pre if r.mode == "overlap" and r.tp == 2 and r.tokens >= 2048]
    measured = [r for r in big if r.hidden_fraction is not None]
    name = "overlap hides >= 50% of the communication at >= 2048 tokens, tp=2"
    if measured:
        ok = all(r.hidden_fraction >= 0.5 for r in measured)
        out.append((name, "met" if ok else "missed", ", ".join(
            f"{r.tokens}: {r.hidden_fraction:.0%} (sp=on {r.sp_on_s:.3f} s, overlap "
            f"{r.median_s:.3f} s, comm alone {r.comm_alone_s:.3f} s, compute alone "
            f"{r.compute_alone_s:.3f} s)" for r in measured)))
    else:
        out.append((name, "not measured", ""))
    name = "sp+overlap <= 0.9x sp=off at >= 2048 tokens, tp=2"
    ratios = [r for r in big if r.ratio_vs_sp_off is not None]
    if ratios:
        ok = all(r.ratio_vs_sp_off <= 0.9 for r in ratios)
        out.append((name, "met" if ok else "missed", ", ".join(
            f"{r.tokens}: {r.ratio_vs_sp_off:.3f}" for r in ratios)))
    else:
        out.append((name, "not measured", ""))
    # pipeline: the bytes crossing the stage boundary are the analytic value: 1/tp of TP with SP
    pipe = [r for r in records if r.boundary_ratio is not None]
    if pipe:
        ok = all(abs(r.boundary_ratio - 1) < 1e-9 for r in pipe)
        ratios = sorted({round(r.boundary_ratio, 4) for r in pipe})
        nums = [f"{len(pipe)} records, ratios {ratios}"]
        for r in pipe:
            if r.sp_step:
                tp_twin = [x for x in pipe if not x.sp_step and x.tp == r.tp
                           and x.scenario == r.scenario and x.tokens == r.tokens]
                if tp_twin:
                    a, b = r.boundary_bytes, tp_twin[0].boundary_bytes
                    nums.append(f"tp={r.tp} {r.scenario} {r.tokens}: SP {a / 1e6:.3f} "
                                f"MB vs TP {b / 1e6:.3f} MB per step ({a / b:.3f})")
        out.append(("pipeline boundary bytes per step = analytic (SP: 1/tp of TP)",
                    "met" if ok else "missed", "; ".join(nums)))
    # cost model on CPU: within 25%
    pred = [r for r in pre if r.predicted_s]
    if pred:
        errs = [(r, r.predicted_s / r.median_s - 1) for r in pred]
        ok = all(abs(e) <= 0.25 for _, e in errs)
        nums = ", ".join(f"{r.model} tp={r.tp} {r.mode} {r.tokens}: {e:+.0%}"
                         for r, e in errs)
        out.append(("cost model within 25% of measured (CPU)", "met" if ok else "missed", nums))
    return out
