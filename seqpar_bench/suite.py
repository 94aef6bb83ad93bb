"""The benchmark: scenarios x modes x tp, modes interleaved run by run in one process tree.

For each model and tp, every mode's subject is loaded once (hosts.py) and the runs go round-robin:
run r times mode A, then B, then C, ... (the order rotating each round), so slow drifts of the
machine hit every mode alike and ratios are taken pair by pair, run r of a mode against run r of
sp=off. Warm-up rounds are discarded.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from seqpar_bench import analytic
from seqpar_bench.catalog import describe, resolve
from seqpar_bench.hosts import Host
from seqpar_bench.record import Record
from seqpar_bench.subjects import DTensorSubject, HFSubject, SeqparSubject
from seqpar.config import DTYPES, ModelConfig, ParallelConfig


@dataclass(frozen=True)
class Mode:
    """One column of the benchmark. A new seqpar variant is one more entry in MODES."""

    name: str
    subject: str
    """"seqpar", "hf" (transformers, one process) or "dtensor" (PyTorch TP + SP)."""
    policy: dict = field(default_factory=dict)
    """seqpar: SP policy settings for this mode's steps (switched per call on a shared LLM)."""
    llm: dict = field(default_factory=dict)
    """seqpar: LLM(...) options that need an LLM of their own (e.g. {"compile": True})."""
    ranks: str = "any"
    """"any": run at every tp; "multi": only at tp > 1; "one": a single process with every
    thread, run next to seqpar's tp=1 (so only where the tp list holds 1)."""
    default: bool = True
    """In the default mode list (else only when named with --modes)."""
    versus: str | None = None
    """Pipeline modes: the one-stage mode they are compared to (same tp, same SP setting)."""

    @property
    def pp(self) -> int:
        return self.llm.get("pipeline_parallel_size", 1)


PIPELINE = {"pipeline_parallel_size": 2}
MODES = (
    Mode("sp=off", "seqpar", {"mode": "off"}),
    Mode("sp=on", "seqpar", {"mode": "on"}, ranks="multi"),
    Mode("sp=auto", "seqpar", {"mode": "auto"}, ranks="multi"),
    Mode("overlap", "seqpar", {"mode": "on", "overlap": True}, ranks="multi"),
    Mode("hf", "hf", ranks="one"),
    Mode("dtensor", "dtensor", ranks="multi"),
    # torch.compile + the SP graph pass: at most two graphs (S = 1 and S dynamic), compiled in an
    # untimed call before the rounds; records carry the seconds it took as compile_s.
    Mode("compile", "seqpar", {"mode": "on"}, llm={"compile": True}, ranks="multi", default=False),
    # Two pipeline stages of tp ranks each, one LLM for these modes; only at Settings.pp_tokens and
    # pp_batches. pp=2-serial keeps one step in flight: the stages take turns.
    Mode("pp=2", "seqpar", {"mode": "off"}, llm=PIPELINE, versus="sp=off"),
    Mode("pp=2+sp", "seqpar", {"mode": "on"}, llm=PIPELINE, ranks="multi", versus="sp=on"),
    Mode("pp=2-serial", "seqpar", {"mode": "off", "in_flight": 1}, llm=PIPELINE, versus="sp=off",
         default=False),
)
BASELINE = "sp=off"


@dataclass
class Settings:
    models: list[str]
    tps: list[int]
    modes: list[Mode]
    tokens: list[int]
    batches: list[int]
    prompt_len: int
    new_tokens: int
    runs: int
    warmup: int
    memory_runs: int
    threads: int
    dtype: str = "float32"
    seed: int = 0
    hardware: str | None = None
    """A cost-model profile: seqpar prefill records get its predicted seconds."""
    pp_tokens: list[int] = field(default_factory=list)
    """Prefill token counts the pipeline modes run at (next to their one-stage modes)."""
    pp_batches: list[int] = field(default_factory=list)
    """Decode batch sizes the pipeline modes run at, where their tp x pp ranks fit the cores."""
    cores: int = field(default_factory=os.cpu_count)
    """Decoding keeps a step in flight per stage, so all tp x pp ranks work at once: more ranks
    than cores would time the OS scheduler (a one-sequence prefill runs one stage at a time)."""
    log: object = print


def valid_tp(cfg: ModelConfig, tp: int) -> str | None:
    """None if seqpar can split `cfg` over tp ranks, else why not (config's own check)."""
    try:
        ParallelConfig(tensor_parallel_size=tp).check_model(cfg)
    except ValueError as e:
        return str(e)
    return None


class CPUShare:
    """How much of the machine other processes used while we measured (from /proc/stat)."""

    def __init__(self):
        self.t0, self.busy0, self.ours0 = time.monotonic(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        t = os.times()  # ours and every child we waited for (the hosts reap their ranks)
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> dict:
        wall = time.monotonic() - self.t0
        others = (self._busy() - self.busy0) - (self._ours() - self.ours0)
        cores = os.cpu_count() or 1
        return {"wall_s": round(wall, 1), "other_cpu_s": round(max(0.0, others), 1),
                "other_share": round(max(0.0, others) / (wall * cores), 3) if wall > 0 else 0.0}


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_total": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "backend": "gloo (CPU)",
            "device": "cpu", "load_avg_before": [round(x, 2) for x in os.getloadavg()]}


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def _pair_ratio(times: list[float], base: list[float] | None) -> float | None:
    if not base or len(base) != len(times):
        return None
    return statistics.median(t / b for t, b in zip(times, base))


class Group:
    """The subjects of one model at one tp, loaded together."""

    def __init__(self, s: Settings, model: str, model_dir: str, tp: int, modes: list[Mode],
                 max_len: int):
        self.model, self.tp, self.modes = model, tp, modes
        self.hosts: dict[tuple, Host] = {}
        per_rank = max(1, s.threads // tp)
        try:
            for m in modes:
                key = self.key(m)
                if key in self.hosts:
                    continue
                s.log(f"  loading {m.subject} (tp={tp if m.ranks != 'one' else 1}, pp={m.pp})")
                if m.subject == "seqpar":
                    # The same threads in total: tp x pp ranks share them. A decode batch's
                    # prompts fit one step, so decode steps hold one token per sequence.
                    threads = max(1, s.threads // (tp * m.pp))
                    budget = max([max_len] + [b * s.prompt_len for b in s.batches + s.pp_batches])
                    llm = {"max_num_batched_tokens": budget, **m.llm}
                    self.hosts[key] = Host(SeqparSubject, 1, threads, name="seqpar",
                                           args=(model_dir, tp, threads, max_len, s.dtype, llm))
                elif m.subject == "hf":
                    self.hosts[key] = Host(HFSubject, 1, s.threads, (model_dir, s.dtype), "hf")
                elif m.subject == "dtensor":
                    self.hosts[key] = Host(DTensorSubject, tp, per_rank, (model_dir, s.dtype),
                                           "dtensor")
                else:
                    raise ValueError(f"mode {m.name}: unknown subject {m.subject!r}")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def key(m: Mode) -> tuple:
        return (m.subject, tuple(sorted(m.llm.items())))

    def host(self, m: Mode) -> Host:
        return self.hosts[self.key(m)]

    def variant(self, m: Mode):
        return m.policy if m.subject == "seqpar" else None

    def info(self) -> dict:
        return {m.name: self.host(m).call("info") for m in self.modes}

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        self.hosts.clear()


def _rounds(s: Settings, modes: list[Mode], measure) -> dict[str, list[float]]:
    """warmup + runs rounds over the modes, the order rotating each round."""
    times = {m.name: [] for m in modes}
    for r in range(s.warmup + s.runs):
        k = r % len(modes)
        for m in modes[k:] + modes[:k]:
            t = measure(m)
            if r >= s.warmup:
                times[m.name].append(t)
    return times


def _compiled_rounds(s: Settings, g: Group, modes: list[Mode],
                     measure) -> tuple[dict[str, list[float]], dict]:
    """_rounds, after one untimed call per compiled mode, in which that mode compiles every graph
    its steps need (Dynamo + the SP pass + Inductor); the timed runs then hold no compile.

    Returns (times, {mode: record fields}): compile_s, the seconds that call spent compiling;
    compile_in_runs_s, any compiling in the rounds after it (0.0 unless a step shape was new).
    """
    compiled = [m for m in modes if m.llm.get("compile")]
    warm = {}
    for m in compiled:
        before = g.host(m).call("compile_s")
        measure(m)
        warm[m.name] = (before, g.host(m).call("compile_s"))
    times = _rounds(s, modes, measure)
    fields = {}
    for m in compiled:
        before, after = warm[m.name]
        fields[m.name] = {"compile_s": after - before,
                          "compile_in_runs_s": g.host(m).call("compile_s") - after}
        if fields[m.name]["compile_in_runs_s"] > 0:
            s.log(f"    {m.name}: {fields[m.name]['compile_in_runs_s']:.1f} s of compiling "
                  "inside the rounds: its times include compiles")
    return times, fields


def _comm_fields(cfg: ModelConfig, stats: dict, seq_lens: list[int], tp: int, steps: int,
                 nbytes: int) -> dict:
    """Measured logical bytes per step vs the analytic minimum for the mode the step ran in."""
    # Every collective of the TP group, ring (overlap) variants included; pipeline send / recv
    # are not part of a TP step's minimum.
    ops = sorted(op for op, v in stats.items()
                 if op not in ("steps", "send", "recv") and isinstance(v, dict) and v.get("calls"))
    measured = sum(stats[op]["bytes"] for op in ops)
    sp = stats["steps"]["sp"] > 0
    minimum = sum(analytic.comm_minimum(cfg, seq_lens, tp, sp, nbytes).values())
    per_step = measured / max(1, steps)
    return {"comm_bytes": per_step, "comm_min_bytes": minimum,
            "comm_ratio": per_step / minimum if minimum else None, "sp_step": sp,
            "comm": {op: stats.get(op) for op in ops}}


def _overlap_fields(times: dict[str, list[float]], alone: list[tuple[float, float]],
                    ops: list[tuple[str, int, int]], nbytes: int) -> dict[str, dict]:
    """How much of an SP step is communication, and how much of it overlap hides.

    alone: (wall s, CPU s of all ranks) per run of the SP step's collectives alone (`ops`, timed
    right after each sp=on run). compute_alone_s = t_sp - t_comm; hidden_fraction =
    (t_sp - t_overlap) / t_comm, from medians. Returns record fields for sp=on and overlap.
    """
    if not alone or "sp=on" not in times:
        return {}
    t_comm = statistics.median(w for w, _ in alone)
    t_sp = statistics.median(times["sp=on"])
    fields = {"comm_alone_s": t_comm, "comm_alone_times_s": [w for w, _ in alone],
              "comm_alone_cpu_s": statistics.median(c for _, c in alone),
              "comm_alone_bytes": sum(rows * cols for _, rows, cols in ops) * nbytes,
              "compute_alone_s": t_sp - t_comm}
    out = {"sp=on": fields}
    if "overlap" in times:
        out["overlap"] = dict(fields, sp_on_s=t_sp, hidden_fraction=(
            t_sp - statistics.median(times["overlap"])) / t_comm)
    return out


def _pipeline_fields(cfg: ModelConfig, stats: dict, tokens: int, sampled: int, tp: int, pp: int,
                     nbytes: int) -> dict:
    """Bytes crossing the stage boundaries per step, measured vs the analytic value.

    Measured: comm_stats()'s send bytes (every rank's point-to-point sends) less the sampled
    tokens the last stage sends rank 0 (a fixed size per sampled row). The
    steps counted ran all SP or all TP: a pipeline mode sets SP on or off.
    """
    steps = stats["steps"]
    count = steps["sp"] + steps["tp"]
    if count == 0:  # nothing ran (sequences that hit max_model_len at once)
        return {}
    sp = steps["sp"] > 0
    rows = tokens + steps["padded_tokens"]  # T, or T_pad on SP steps
    measured = (stats["send"]["bytes"] - analytic.pipeline_sampled_bytes(sampled, pp)) / count
    minimum = analytic.boundary_bytes(cfg, rows, tp, pp, sp, nbytes) / count
    return {"sp_step": sp, "steps": count, "boundary_bytes": measured,
            "boundary_min_bytes": minimum, "boundary_ratio": measured / minimum,
            "p2p": {op: stats[op] for op in ("send", "recv")}}


def _modes_at(modes: list[Mode], main: bool, pipeline: bool) -> list[Mode]:
    """The modes measured at one token count or batch: the one-stage modes where it is a main
    point (Settings.tokens, batches); at a pipeline point the pipeline modes, next to the modes
    they are compared to and the baseline."""
    twins = {m.versus for m in modes if m.pp > 1}
    twins |= {BASELINE} if twins else set()
    return [m for m in modes
            if (main and m.pp == 1) or (pipeline and (m.pp > 1 or m.name in twins))]


def run_group(s: Settings, model: str, cfg: ModelConfig, g: Group, out: list[Record]) -> None:
    gen = torch.Generator().manual_seed(s.seed)
    nbytes = DTYPES[s.dtype].itemsize
    info = g.info()
    threshold = next((v.get("threshold") for v in info.values() if v.get("threshold")), None)
    base_fields = dict(model=model, model_desc=describe(model), threads=s.threads)

    def tp_of(m: Mode) -> int:
        return 1 if m.ranks == "one" else g.tp

    def versus(m: Mode, times: dict[str, list[float]], paired: bool) -> dict:
        """A pipeline mode's ratio to its one-stage twin: run by run (prefill) or of medians."""
        if m.pp == 1 or m.versus not in times:
            return {}
        mine, theirs = times[m.name], times[m.versus]
        ratio = (_pair_ratio(mine, theirs) if paired
                 else statistics.median(mine) / statistics.median(theirs))
        return {"ratio_vs_pp1": ratio}

    for t in sorted(set(s.tokens) | set(s.pp_tokens)):
        modes = _modes_at(g.modes, t in s.tokens, t in s.pp_tokens)
        if not modes:
            continue
        ids = torch.randint(cfg.vocab_size, (t,), generator=gen).tolist()
        s.log(f"  prefill {t} tokens: {s.warmup} warm-up + {s.runs} rounds of "
              f"{', '.join(m.name for m in modes)}")
        sp_on = next((m for m in modes if m.name == "sp=on"), None)
        comm_ops = analytic.step_collectives(cfg, [t], g.tp, sp=True) if sp_on else []
        comm_alone = []

        def prefill(m: Mode) -> float:
            seconds = g.host(m).call("prefill", ids, g.variant(m))
            if m is sp_on:  # the SP step's collectives alone, right after the step
                comm_alone.append(g.host(m).call("collectives", comm_ops))
            return seconds

        times, compiled = _compiled_rounds(s, g, modes, prefill)
        overlap = _overlap_fields(times, comm_alone[s.warmup:], comm_ops, nbytes)
        base = times.get(BASELINE)
        for m in modes:
            rec = dict(base_fields, scenario="prefill", mode=m.name, tp=tp_of(m), pp=m.pp,
                       tokens=t, runs=s.runs, **_stats(times[m.name]),
                       ratio_vs_sp_off=_pair_ratio(times[m.name], base),
                       tokens_per_s=t / statistics.median(times[m.name]),
                       **versus(m, times, paired=True), **compiled.get(m.name, {}),
                       **overlap.get(m.name, {}))
            stats = None
            if s.memory_runs and m.pp == 1:
                peaks = None
                for _ in range(s.memory_runs):
                    got = g.host(m).call_all("memory", ids, g.variant(m))
                    if m.subject == "seqpar":  # rank 0 answers for all: (peaks, comm counters)
                        got, stats = got[0]
                    # Readings repeat to the byte on an idle machine; the smallest of each rank
                    # is kept, as for times.
                    peaks = got if peaks is None else [min(a, b) for a, b in zip(peaks, got)]
                rec["peak_bytes"] = peaks
            if m.subject == "seqpar":
                stats = stats or g.host(m).call("comm", [ids], 1, g.variant(m))
                if m.pp > 1:
                    rec.update(_pipeline_fields(cfg, stats, t, 1, g.tp, m.pp, nbytes))
                else:
                    rec.update(_comm_fields(cfg, stats, [t], g.tp, 1, nbytes))
                    sp = rec["sp_step"]
                    rec["peak_bytes_predicted"] = analytic.peak_activation(cfg, t, g.tp, sp, nbytes)
                    rec["overlap_step"] = bool(sp and m.policy.get("overlap"))
            out.append(Record(**rec))
            s.log("    " + _one_line(out[-1]))

    for b in sorted(set(s.batches) | set(s.pp_batches)):
        modes = _modes_at([m for m in g.modes if g.tp * m.pp <= s.cores], b in s.batches,
                          b in s.pp_batches)
        if not modes:
            continue
        prompts = [torch.randint(cfg.vocab_size, (s.prompt_len,), generator=gen).tolist()
                   for _ in range(b)]
        n = s.new_tokens
        s.log(f"  decode batch {b}: {s.prompt_len}-token prompts, {n} new tokens each")

        def decode(m: Mode) -> tuple[float, float]:
            host, v = g.host(m), g.variant(m)
            # (prefill + first token, all n tokens): decode time = the difference of medians,
            # which stays positive where a run-by-run difference of two noisy runs may not.
            return host.call("generate", prompts, 1, v), host.call("generate", prompts, n, v)

        pairs, compiled = _compiled_rounds(s, g, modes, decode)
        times = {}
        for name, ts in pairs.items():
            first = statistics.median(a for a, _ in ts)
            times[name] = [tn - first for _, tn in ts]
        base = times.get(BASELINE)
        for m in modes:
            rec = dict(base_fields, scenario="decode", mode=m.name, tp=tp_of(m), pp=m.pp, tokens=b,
                       batch=b, prompt_len=s.prompt_len, new_tokens=n, runs=s.runs,
                       **_stats(times[m.name]),
                       # a ratio of medians: run-by-run differences are too noisy to pair
                       ratio_vs_sp_off=(statistics.median(times[m.name]) / statistics.median(base)
                                        if base else None),
                       tokens_per_s=b * (n - 1) / statistics.median(times[m.name]),
                       first_token_s=statistics.median(a for a, _ in pairs[m.name]),
                       **versus(m, times, paired=False), **compiled.get(m.name, {}))
            if m.subject == "seqpar" and n > 1:
                one = g.host(m).call("comm", prompts, 1, g.variant(m))
                full = g.host(m).call("comm", prompts, n, g.variant(m))
                diff = {op: {"calls": full[op]["calls"] - one[op]["calls"],
                             "bytes": full[op]["bytes"] - one[op]["bytes"]}
                        for op in full if op != "steps"}
                diff["steps"] = {k: full["steps"][k] - one["steps"][k] for k in full["steps"]}
                if m.pp > 1:  # the n - 1 decode rounds: b (n - 1) tokens, each sampled
                    rec.update(_pipeline_fields(cfg, diff, b * (n - 1), b * (n - 1), g.tp, m.pp,
                                                nbytes))
                else:
                    rec.update(_comm_fields(cfg, diff, [1] * b, g.tp, n - 1, nbytes))
            out.append(Record(**rec))
            s.log("    " + _one_line(out[-1]))
    for m in g.modes:
        out_info = info.get(m.name) or {}
        if out_info.get("threshold") is not None:
            s.log(f"  {m.name}: measured SP threshold {out_info['threshold']} tokens")
    g.sp_threshold = threshold


def _one_line(r: Record) -> str:
    ratio = r.ratio_vs_sp_off
    extra = f" x{ratio:.3f} vs sp=off" if ratio is not None and r.mode != BASELINE else ""
    mem = f", peak {max(r.peak_bytes) / 2**20:.1f} MiB/rank" if r.peak_bytes else ""
    return (f"{r.mode:>11} tp={r.tp}: median {r.median_s:.4f} s "
            f"(min {r.min_s:.4f}, max {r.max_s:.4f}){extra}{mem}")


def add_predictions(records: list[Record], hardware: str) -> None:
    """The cost model's seconds for each seqpar prefill record run at the profile's tp."""
    from seqpar_bench.costmodel import load_profile, step_time
    hw = load_profile(hardware)
    configs = {}
    for r in records:
        r.predicted_s = None
        if (r.scenario != "prefill" or r.sp_step is None or r.pp > 1
                or hw.ranks not in (0, r.tp)):
            continue
        if r.model not in configs:
            configs[r.model] = ModelConfig.from_dir(resolve(r.model))
        overlap = r.overlap_step if r.overlap_step is not None else (
            r.mode == "overlap" and r.sp_step)
        mode = "overlap" if overlap else "sp" if r.sp_step else "tp"
        r.predicted_s = step_time(configs[r.model], hw, r.tokens, r.tp, mode)


def run(s: Settings) -> dict:
    """Run every model x tp group; return {"machine": .., "records": [..], "notes": [..]}."""
    machine = machine_info(s.threads)
    share = CPUShare()
    records, notes, thresholds = [], [], {}
    for model in s.models:
        model_dir = str(resolve(model))
        cfg = ModelConfig.from_dir(model_dir)
        tps = []
        for tp in s.tps:
            why = valid_tp(cfg, tp)
            if why:
                notes.append(f"{model}: tp={tp} skipped ({why})")
                s.log(f"{model}: tp={tp} skipped: {why}")
            else:
                tps.append(tp)
        fits = lambda ts: [t for t in ts if t <= cfg.max_position_embeddings]  # noqa: E731
        tokens, pp_tokens = fits(s.tokens), fits(s.pp_tokens)
        if len(tokens) + len(pp_tokens) < len(s.tokens) + len(s.pp_tokens):
            notes.append(f"{model}: token counts above {cfg.max_position_embeddings} skipped")
        max_len = min(cfg.max_position_embeddings,
                      max(tokens + pp_tokens + [s.prompt_len + s.new_tokens]) + 1)
        for tp in tps:
            modes = [m for m in s.modes if (m.ranks == "any" or (m.ranks == "multi" and tp > 1)
                                            or (m.ranks == "one" and tp == 1))]
            if not modes:
                continue
            s.log(f"{model} ({describe(model)}), tp={tp}: {', '.join(m.name for m in modes)}")
            crowded = [f"{m.name} ({tp * m.pp} ranks)" for m in modes if tp * m.pp > s.cores]
            if crowded and s.pp_batches:
                notes.append(f"{model} tp={tp}: no decode rows for {', '.join(crowded)}: decoding "
                             f"keeps every rank busy at once, more ranks than the {s.cores} cores")
            group = Group(s, model, model_dir, tp, modes, max_len)
            try:
                sub = Settings(**{**s.__dict__, "tokens": tokens, "pp_tokens": pp_tokens})
                run_group(sub, model, cfg, group, records)
                if getattr(group, "sp_threshold", None):
                    thresholds[f"{model} tp={tp}"] = group.sp_threshold
            finally:
                group.close()
    if s.hardware:
        add_predictions(records, s.hardware)
    machine.update(share.others())
    machine["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": machine, "records": records, "notes": notes, "sp_thresholds": thresholds}
