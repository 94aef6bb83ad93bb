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

from seqpar.bench import analytic
from seqpar.bench.hosts import Host
from seqpar.bench.models import describe, resolve
from seqpar.bench.subjects import DTensorSubject, HFSubject, SeqparSubject
from seqpar.config import DTYPES, ModelConfig


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


MODES = (
    Mode("sp=off", "seqpar", {"mode": "off"}),
    Mode("sp=on", "seqpar", {"mode": "on"}, ranks="multi"),
    Mode("sp=auto", "seqpar", {"mode": "auto"}, ranks="multi"),
    Mode("overlap", "seqpar", {"mode": "on", "overlap": True}, ranks="multi"),
    Mode("hf", "hf", ranks="one"),
    Mode("dtensor", "dtensor", ranks="multi"),
    # torch.compile + the SP graph pass: compiles once per token count (minutes each on CPU).
    Mode("compile", "seqpar", {"mode": "on"}, llm={"compile": True}, ranks="multi", default=False),
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
    log: object = print


def valid_tp(cfg: ModelConfig, tp: int) -> str | None:
    """None if seqpar can split `cfg` over tp ranks, else why not."""
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        return f"{cfg.num_heads} heads / MLP {cfg.intermediate_size} not divisible by {tp}"
    kv = cfg.num_kv_heads
    if kv % tp and tp % kv:
        return f"{kv} KV heads vs tp {tp}"
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
                s.log(f"  loading {m.subject} (tp={tp if m.ranks != 'one' else 1})")
                if m.subject == "seqpar":
                    self.hosts[key] = Host(SeqparSubject, 1, per_rank, name="seqpar",
                                           args=(model_dir, tp, per_rank, max_len, s.dtype, m.llm))
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


def run_group(s: Settings, model: str, cfg: ModelConfig, g: Group, out: list[dict]) -> None:
    gen = torch.Generator().manual_seed(s.seed)
    nbytes = DTYPES[s.dtype].itemsize
    info = g.info()
    threshold = next((v.get("threshold") for v in info.values() if v.get("threshold")), None)
    base_fields = dict(model=model, model_desc=describe(model), threads=s.threads)

    def tp_of(m: Mode) -> int:
        return 1 if m.ranks == "one" else g.tp

    for t in s.tokens:
        ids = torch.randint(cfg.vocab_size, (t,), generator=gen).tolist()
        s.log(f"  prefill {t} tokens: {s.warmup} warm-up + {s.runs} rounds of "
              f"{', '.join(m.name for m in g.modes)}")
        times = _rounds(s, g.modes, lambda m: g.host(m).call("prefill", ids, g.variant(m)))
        base = times.get(BASELINE)
        for m in g.modes:
            rec = dict(base_fields, scenario="prefill", mode=m.name, tp=tp_of(m), tokens=t,
                       runs=s.runs, **_stats(times[m.name]),
                       ratio_vs_sp_off=_pair_ratio(times[m.name], base),
                       tokens_per_s=t / statistics.median(times[m.name]))
            stats = None
            if s.memory_runs:
                peaks = None
                for _ in range(s.memory_runs):
                    got = g.host(m).call_all("memory", ids, g.variant(m))
                    if m.subject == "seqpar":  # rank 0 answers for all: (peaks, comm counters)
                        got, stats = got[0]
                    # The CPU probe misses frees made on gloo's threads (readings inflate): keep
                    # each rank's smallest (docs/benchmarks.md says where it also deflates).
                    peaks = got if peaks is None else [min(a, b) for a, b in zip(peaks, got)]
                rec["peak_bytes"] = peaks
            if m.subject == "seqpar":
                stats = stats or g.host(m).call("comm", [ids], 1, g.variant(m))
                rec.update(_comm_fields(cfg, stats, [t], g.tp, 1, nbytes))
                sp = rec["sp_step"]
                rec["peak_bytes_predicted"] = analytic.peak_activation(cfg, t, g.tp, sp, nbytes)
                rec["overlap_step"] = bool(sp and m.policy.get("overlap"))
            out.append(rec)
            s.log("    " + _one_line(rec))

    for b in s.batches:
        prompts = [torch.randint(cfg.vocab_size, (s.prompt_len,), generator=gen).tolist()
                   for _ in range(b)]
        n = s.new_tokens
        s.log(f"  decode batch {b}: {s.prompt_len}-token prompts, {n} new tokens each")

        def decode(m: Mode) -> tuple[float, float]:
            host, v = g.host(m), g.variant(m)
            # (prefill + first token, all n tokens): decode time = the difference of medians,
            # which stays positive where a run-by-run difference of two noisy runs may not.
            return host.call("generate", prompts, 1, v), host.call("generate", prompts, n, v)

        pairs = _rounds(s, g.modes, decode)
        times = {}
        for name, ts in pairs.items():
            first = statistics.median(a for a, _ in ts)
            times[name] = [tn - first for _, tn in ts]
        base = times.get(BASELINE)
        for m in g.modes:
            rec = dict(base_fields, scenario="decode", mode=m.name, tp=tp_of(m), tokens=b, batch=b,
                       prompt_len=s.prompt_len, new_tokens=n, runs=s.runs,
                       **_stats(times[m.name]),
                       # a ratio of medians: run-by-run differences are too noisy to pair
                       ratio_vs_sp_off=(statistics.median(times[m.name]) / statistics.median(base)
                                        if base else None),
                       tokens_per_s=b * (n - 1) / statistics.median(times[m.name]),
                       first_token_s=statistics.median(a for a, _ in pairs[m.name]))
            if m.subject == "seqpar" and n > 1:
                one = g.host(m).call("comm", prompts, 1, g.variant(m))
                full = g.host(m).call("comm", prompts, n, g.variant(m))
                diff = {op: {"calls": full[op]["calls"] - one[op]["calls"],
                             "bytes": full[op]["bytes"] - one[op]["bytes"]}
                        for op in full if op != "steps"}
                diff["steps"] = {k: full["steps"][k] - one["steps"][k] for k in full["steps"]}
                rec.update(_comm_fields(cfg, diff, [1] * b, g.tp, n - 1, nbytes))
            out.append(rec)
            s.log("    " + _one_line(rec))
    for m in g.modes:
        out_info = info.get(m.name) or {}
        if out_info.get("threshold") is not None:
            s.log(f"  {m.name}: measured SP threshold {out_info['threshold']} tokens")
    g.sp_threshold = threshold


def _one_line(r: dict) -> str:
    ratio = r.get("ratio_vs_sp_off")
    extra = f" x{ratio:.3f} vs sp=off" if ratio is not None and r["mode"] != BASELINE else ""
    mem = r.get("peak_bytes")
    mem = f", peak {max(mem) / 2**20:.1f} MiB/rank" if mem else ""
    return (f"{r['mode']:>8} tp={r['tp']}: median {r['median_s']:.4f} s "
            f"(min {r['min_s']:.4f}, max {r['max_s']:.4f}){extra}{mem}")


def add_predictions(records: list[dict], hardware: str) -> None:
    """The cost model's seconds for each seqpar prefill record run at the profile's tp."""
    from seqpar.bench.costmodel import load_profile, step_time
    hw = load_profile(hardware)
    configs = {}
    for r in records:
        r.pop("predicted_s", None)
        if r["scenario"] != "prefill" or "sp_step" not in r or hw.ranks not in (0, r["tp"]):
            continue
        if r["model"] not in configs:
            configs[r["model"]] = ModelConfig.from_dir(resolve(r["model"]))
        overlap = r.get("overlap_step", r["mode"] == "overlap" and r["sp_step"])
        mode = "overlap" if overlap else "sp" if r["sp_step"] else "tp"
        r["predicted_s"] = step_time(configs[r["model"]], hw, r["tokens"], r["tp"], mode)


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
        tokens = [t for t in s.tokens if t <= cfg.max_position_embeddings]
        if len(tokens) < len(s.tokens):
            notes.append(f"{model}: token counts above {cfg.max_position_embeddings} skipped")
        max_len = min(cfg.max_position_embeddings,
                      max(tokens + [s.prompt_len + s.new_tokens]) + 1)
        for tp in tps:
            modes = [m for m in s.modes if (m.ranks == "any" or (m.ranks == "multi" and tp > 1)
                                            or (m.ranks == "one" and tp == 1))]
            if not modes:
                continue
            s.log(f"{model} ({describe(model)}), tp={tp}: {', '.join(m.name for m in modes)}")
            group = Group(s, model, model_dir, tp, modes, max_len)
            try:
                sub = Settings(**{**s.__dict__, "tokens": tokens})
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
