"""`seqpar bench engine`: the serving engine core (issue 11) against its targets, in one run.

One model at tp=1 with every thread, through the public API only (LLM, generate, cache_stats):
  1. decode tok/s at batch 1, 16 and 64 beside HF transformers' `generate` (same weights, dtype
     and threads; HF with its KV cache; greedy), the two timed in alternation round by round;
  2. the machine's read bandwidth (a sum over a 1 GiB tensor) and the batch-1 decode step against
     the roofline: the model's weight bytes in the run's dtype / that bandwidth;
  3. TTFT (a max_tokens=1 request) of a prompt whose prefix is cached vs one whose prefix is new,
     the same length: each round a fresh prefix is timed uncached, then again with another tail;
  4. the KV pool per rank (cache_stats' num_blocks x block bytes) vs the formula from config.json;
  5. a long prefill as a fraction of the machine's matmul rate, F.linear on [T, H] x [H, I] in the
     same dtype, measured in the same run;
  6. llama.cpp as a peer where `llama_cpp` is importable (the optional extra `llamacpp`): an F16
     copy of the model's GGUF, batch-1 decode and the long prefill, in alternation with seqpar.
Every timing is taken inside the process doing the work (hosts.py); warm-up rounds are dropped;
median and min of the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from seqpar_bench.catalog import describe, resolve
from seqpar_bench.hosts import Host
from seqpar_bench.subjects import HFSubject
from seqpar_bench.suite import CPUShare, machine_info
from seqpar_bench.timing import timed
from seqpar.config import DTYPES
from seqpar.loader.resolve import cache_dir

GiB = 2 ** 30
BLOCK_SIZE = 16
"""The engine's default KV block size, which the bench runs with."""
TARGETS = dict(decode_batch1=1.1, decode_batched=1.5, roofline=2.0, prefill_matmul=0.6,
               ttft_cached=0.3)
"""Issue 11's targets: x HF tok/s at batch 1 and at batch >= 16; batch-1 step / roofline (at
most); prefill FLOP/s / matmul FLOP/s (at least); cached-prefix TTFT / uncached (at most)."""


@dataclass
class EngineSettings:
    model: str = "smollm2"
    dtype: str = "bfloat16"
    """Both engines' dtype, named: HF needs a concrete one. bf16 is what dtype="auto" gives
    SmolLM2 (a quantized GGUF) on a CPU with native bf16, and this CPU's fast path."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batches: list[int] = field(default_factory=lambda: [1, 16, 64])
    prompt_len: int = 128
    new_tokens: int = 64
    rounds: int = 3
    warmup: int = 1
    prefix_len: int = 512
    """Cached prefix of the TTFT prompts (a multiple of the block size: only full blocks are
    cached)."""
    tail_len: int = 64
    """Tokens after the prefix, different in the cached request."""
    prefill_tokens: int = 2048
    bandwidth_bytes: int = GiB
    kv_cache_memory_bytes: int | None = None
    """Default: what the largest step needs (see kv_budget), not a whole number of blocks."""
    seed: int = 0
    log: object = print


@dataclass
class Timing:
    """One measured quantity: the seconds of each measured round and the rate they give."""

    what: str
    """decode | ttft_uncached | ttft_cached | prefill | bandwidth | matmul"""
    engine: str
    """seqpar | hf | llama.cpp | torch (the machine's own rates)"""
    size: int
    """decode: the batch; ttft / prefill: prompt tokens; bandwidth: bytes read; matmul: rows."""
    work: float
    """What one round does, in `unit`."""
    unit: str
    """tokens (decode: generated after the first), FLOP or B."""
    times_s: list[float]
    median_s: float = 0.0
    min_s: float = 0.0
    rate: float = 0.0
    """work / median_s (tok/s, FLOP/s, B/s)."""
    best_rate: float = 0.0
    """work / min_s: the least disturbed round."""

    def __post_init__(self):
        self.median_s, self.min_s = statistics.median(self.times_s), min(self.times_s)
        self.rate, self.best_rate = self.work / self.median_s, self.work / self.min_s


@dataclass
class KVCheck:
    """The KV pool a rank allocated against the formula of issue 11, from config.json."""

    budget_bytes: int
    """kv_cache_memory_bytes given to LLM."""
    block_bytes: int
    """2 (K and V) x layers x KV heads per rank x block_size x head_dim x dtype bytes."""
    formula_blocks: int
    """budget_bytes // block_bytes."""
    num_blocks: int
    """cache_stats()["num_blocks"]."""
    pool_bytes: int = 0
    """num_blocks x block_bytes."""
    matches: bool = False

    def __post_init__(self):
        self.pool_bytes = self.num_blocks * self.block_bytes
        self.matches = self.num_blocks == self.formula_blocks


class EngineSubject:
    """One seqpar LLM at tp=1 with prefix caching on (the default), in a process of its own."""

    def __init__(self, rank: int, world: int, model_dir: str, dtype: str, threads: int,
                 max_model_len: int, max_num_batched_tokens: int, kv_bytes: int):
        from seqpar import LLM
        self.llm = LLM(model_dir, tensor_parallel_size=1, dtype=dtype, threads_per_rank=threads,
                       max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                       kv_cache_memory_bytes=kv_bytes, block_size=BLOCK_SIZE)

    def generate(self, prompts: list[list[int]], n: int) -> float:
        from seqpar import SamplingParams
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate(prompts, params)
        return time.perf_counter() - t0

    def cache_stats(self) -> dict:
        return self.llm.cache_stats()

    def close(self) -> None:
        self.llm.close()


# ---- what the model is, from its own files (not from the engine under test) --------------------

def _config(model_dir: Path) -> dict:
    with open(model_dir / "config.json") as f:
        raw = json.load(f)
    heads = raw["num_attention_heads"]
    return dict(layers=raw["num_hidden_layers"], hidden=raw["hidden_size"],
                inter=raw["intermediate_size"], vocab=raw["vocab_size"], heads=heads,
                kv_heads=raw.get("num_key_value_heads", heads),
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads)


def kv_block_bytes(c: dict, dtype: str) -> int:
    """2 x layers x kv_heads_per_rank x block_size x head_dim x dtype bytes (issue 11); at tp=1
    the one rank holds every KV head."""
    return 2 * c["layers"] * c["kv_heads"] * BLOCK_SIZE * c["head_dim"] * DTYPES[dtype].itemsize


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of every weight in `dtype`: what a decode step streams once (a tied embedding is read
    once, as the LM head; the lookup reads one row per token)."""
    from safetensors import safe_open
    numel = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                numel += math.prod(shape)
    return numel * DTYPES[dtype].itemsize


def prefill_flops(c: dict, tokens: int) -> int:
    """Matmul FLOPs of one prefill of `tokens` tokens that samples one row: the projections and
    MLP of every token, causal attention (QK^T and PV over the keys at or before each query), the
    LM head of the last row."""
    h, d = c["hidden"], c["head_dim"]
    proj = 2 * h * (c["heads"] + 2 * c["kv_heads"]) * d + 2 * c["heads"] * d * h
    mlp = 2 * 3 * h * c["inter"]
    attn = 2 * 2 * c["heads"] * d * tokens * (tokens + 1) // 2
    return c["layers"] * ((proj + mlp) * tokens + attn) + 2 * h * c["vocab"]


def kv_budget(c: dict, s: EngineSettings, max_model_len: int) -> int:
    """Enough blocks for the largest decode batch plus two TTFT prompts (the cached prefix stays),
    and half a block over, so the floor in the formula shows."""
    per_seq = -(-(s.prompt_len + s.new_tokens) // BLOCK_SIZE)
    blocks = max(max(s.batches) * per_seq, -(-max_model_len // BLOCK_SIZE)) + 2 * (
        -(-(s.prefix_len + s.tail_len + 1) // BLOCK_SIZE))
    block = kv_block_bytes(c, s.dtype)
    return blocks * block + block // 2


# ---- the machine's own rates --------------------------------------------------------------------

def read_bandwidth(nbytes: int, rounds: int, warmup: int) -> Timing:
    """A sum over an nbytes float32 tensor: every byte read once, almost no arithmetic."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    times = timed(lambda: x.sum(), max(rounds, 5), max(warmup, 1))
    return Timing("bandwidth", "torch", nbytes, nbytes, "B", times)


def matmul_rate(rows: int, hidden: int, inter: int, dtype: str, rounds: int, warmup: int,
                calls: int = 10) -> Timing:
    """F.linear of [rows, hidden] x [hidden, inter] in `dtype` (the MLP's up projection of a
    prefill), `calls` back to back per round."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(DTYPES[dtype])
    w = torch.randn(inter, hidden, generator=g).to(DTYPES[dtype])  # [I, H], as nn.Linear keeps it

    def run():
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
    times = timed(run, max(rounds, 5), max(warmup, 1))
    return Timing("matmul", "torch", rows, 2 * rows * hidden * inter * calls, "FLOP", times)


# ---- the run ------------------------------------------------------------------------------------

def _alternate(rounds: int, warmup: int, subjects: dict, measure) -> dict[str, list]:
    """warmup + rounds rounds over the subjects (order rotating); measure(subject, round) of
    each measured round."""
    out = {name: [] for name in subjects}
    names = list(subjects)
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            got = measure(subjects[name], r)
            if r >= warmup:
                out[name].append(got)
    return out


SINGLE = ("llama.cpp",)
"""Engines run at batch 1 only (this bench drives llama.cpp one sequence at a time)."""


def measure_decode(s: EngineSettings, hosts: dict, vocab: int, gen) -> list[Timing]:
    """Per batch: each round generates 1 and then new_tokens tokens per prompt; the decode time
    is the second less the median of the first (prefill and first token), as in the main bench."""
    out = []
    n = s.new_tokens
    for b in s.batches:
        prompts = torch.randint(vocab, (b, s.prompt_len), generator=gen).tolist()
        here = {k: h for k, h in hosts.items() if b == 1 or k not in SINGLE}
        s.log(f"  decode batch {b}: {s.prompt_len}-token prompts, {n} new tokens, "
              f"{s.warmup} warm-up + {s.rounds} rounds of {', '.join(here)}")
        pairs = _alternate(s.rounds, s.warmup, here, lambda h, _: (
            h.call("generate", prompts, 1), h.call("generate", prompts, n)))
        for name, ts in pairs.items():
            first = statistics.median(a for a, _ in ts)
            t = Timing("decode", name, b, b * (n - 1), "tokens", [tn - first for _, tn in ts])
            out.append(t)
            s.log(f"    {name}: {t.rate:.1f} tok/s (median; best {t.best_rate:.1f}), "
                  f"step {t.median_s / (n - 1) * 1e3:.1f} ms")
    return out


def measure_ttft(s: EngineSettings, host: Host, vocab: int, gen) -> tuple[list[Timing], dict]:
    """Each round: a fresh prefix + tail A (uncached: nobody sent that prefix), then the same
    prefix + tail B (its prefix blocks cached by the first). Returns the timings and the prefix
    hits counted over the cached requests (prompt tokens)."""
    total = s.prefix_len + s.tail_len
    s.log(f"  TTFT: {total}-token prompts, {s.prefix_len}-token prefix cached or new")
    uncached, cached, hits = [], [], 0
    for r in range(s.warmup + s.rounds):
        prefix, a, b = (torch.randint(vocab, (k,), generator=gen).tolist()
                        for k in (s.prefix_len, s.tail_len, s.tail_len))
        t_new = host.call("generate", [prefix + a], 1)
        before = host.call("cache_stats")["prefix_hits"]
        t_hit = host.call("generate", [prefix + b], 1)
        if r >= s.warmup:
            uncached.append(t_new)
            cached.append(t_hit)
            hits += host.call("cache_stats")["prefix_hits"] - before
    out = [Timing("ttft_uncached", "seqpar", total, total, "tokens", uncached),
           Timing("ttft_cached", "seqpar", total, total, "tokens", cached)]
    s.log(f"    uncached {out[0].median_s * 1e3:.1f} ms, cached {out[1].median_s * 1e3:.1f} ms "
          f"(prefix hits {hits} tokens over {s.rounds} requests)")
    return out, {"prefix_hits": hits, "requests": s.rounds}


def measure_prefill(s: EngineSettings, hosts: dict, c: dict, vocab: int, gen) -> list[Timing]:
    """One sequence of prefill_tokens, max_tokens=1, a new prompt every round (no prefix hit),
    the engines in alternation on the same prompt."""
    s.log(f"  prefill {s.prefill_tokens} tokens: {', '.join(hosts)}")
    prompts = [torch.randint(vocab, (s.prefill_tokens,), generator=gen).tolist()
               for _ in range(s.warmup + s.rounds)]
    times = _alternate(s.rounds, s.warmup, hosts, lambda h, r: h.call("generate", [prompts[r]], 1))
    return [Timing("prefill", name, s.prefill_tokens, prefill_flops(c, s.prefill_tokens), "FLOP",
                   ts) for name, ts in times.items()]


def write_f16_gguf(src: Path, dst: Path) -> Path:
    """An F16 copy of a GGUF file, for llama.cpp: every tensor dequantized with the gguf library
    (the same values seqpar's converted checkpoint holds), matrices stored F16 and vectors (the
    norms) F32 as llama.cpp's own converter keeps them; the metadata (tokenizer included) copied,
    general.file_type set to F16. Tensors keep llama.cpp's row order (its q/k permutation)."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the header's own fields; the two the writer sets itself
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, f.contents(), f.types[0],
                             sub_type=f.types[-1] if array else None)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, [rows, row length]
        writer.add_tensor(t.name, w.astype(np.float16 if w.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


class LlamaCppSubject:
    """llama.cpp (llama-cpp-python) on an F16 GGUF, one sequence at a time, greedy."""

    def __init__(self, rank: int, world: int, gguf_path: str, threads: int, n_ctx: int):
        from llama_cpp import Llama
        # n_batch = n_ctx: a prompt goes in as one batch, as seqpar prefills it in one step
        self.llm = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def generate(self, prompts: list[list[int]], n: int) -> float:
        import itertools
        (ids,) = prompts
        self.llm.reset()  # n_tokens = 0: generate() finds no prefix to reuse
        t0 = time.perf_counter()
        # temp=0: its greedy sampler; the n-th token is sampled, not evaluated (islice stops)
        for _ in itertools.islice(self.llm.generate(ids, temp=0.0, reset=True), n):
            pass
        return time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


def llamacpp_host(s: EngineSettings, n_ctx: int, workdir: Path) -> tuple[Host | None, dict]:
    """(llama.cpp's host, its status): only where llama-cpp-python is installed (`pip install
    .[llamacpp]`, a build from source of about 5 minutes) and the model comes from a GGUF."""
    from seqpar.loader.resolve import gguf_source
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, {"status": "not measured",
                      "reason": "llama_cpp is not importable (the optional extra `llamacpp`, "
                                "llama-cpp-python built from source, is not installed)"}
    src = gguf_source(s.model)
    if src is None:
        return None, {"status": "not measured", "reason": f"{s.model} is not a GGUF model"}
    f16 = workdir / f"{src.stem}.F16.gguf"
    if not f16.is_file():
        s.log(f"  writing {f16} for llama.cpp")
        write_f16_gguf(src, f16.with_suffix(".tmp")).rename(f16)
    host = Host(LlamaCppSubject, 1, s.threads, (str(f16), s.threads, n_ctx), "llama.cpp")
    return host, {"status": "measured", "gguf": str(f16), "version": llama_cpp.__version__}


def run(s: EngineSettings) -> dict:
    model_dir = resolve(s.model)
    c = _config(model_dir)
    machine = machine_info(s.threads)
    machine["backend"] = "one process per engine (tp=1)"
    share = CPUShare()
    gen = torch.Generator().manual_seed(s.seed)
    longest = max(s.prefill_tokens, s.prefix_len + s.tail_len, s.prompt_len + s.new_tokens)
    max_model_len = longest + 1
    budget = s.kv_cache_memory_bytes or kv_budget(c, s, max_model_len)
    batched = max(max_model_len, max(s.batches) * s.prompt_len)  # a batch's prompts in one step
    s.log(f"{s.model} ({describe(s.model)}), tp=1, {s.dtype}, {s.threads} threads")
    seqpar = Host(EngineSubject, 1, s.threads, (str(model_dir), s.dtype, s.threads, max_model_len,
                                                 batched, budget), "seqpar")
    hf = peer = None
    try:
        hf = Host(HFSubject, 1, s.threads, (str(model_dir), s.dtype), "hf")
        peer, llamacpp = llamacpp_host(s, max_model_len, cache_dir() / "bench")
        peers = {"llama.cpp": peer} if peer else {}
        stats = seqpar.call("cache_stats")
        block = kv_block_bytes(c, s.dtype)
        kv = KVCheck(budget, block, budget // block, stats["num_blocks"])
        torch.set_num_threads(s.threads)  # the machine probes below run here, the engines idle
        bandwidth = read_bandwidth(s.bandwidth_bytes, s.rounds, s.warmup)
        s.log(f"  read bandwidth {bandwidth.rate / 1e9:.1f} GB/s (median)")
        timings = [bandwidth]
        timings += measure_decode(s, {"seqpar": seqpar, "hf": hf, **peers}, c["vocab"], gen)
        hf.close()
        hf = None
        ttft, hits = measure_ttft(s, seqpar, c["vocab"], gen)
        timings += ttft
        timings += measure_prefill(s, {"seqpar": seqpar, **peers}, c, c["vocab"], gen)
        timings.append(matmul_rate(s.prefill_tokens, c["hidden"], c["inter"], s.dtype, s.rounds,
                                   s.warmup))
        s.log(f"  matmul {timings[-1].rate / 1e9:.0f} GFLOP/s, prefill "
              + ", ".join(f"{x.engine} {x.median_s:.3f} s" for x in timings if x.what == "prefill"))
    finally:
        for host in (hf, peer):
            if host is not None:
                host.close()
        seqpar.close()
    machine.update(share.others())
    machine["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: v for k, v in asdict(s).items() if k != "log"}
    result = {"machine": machine, "settings": settings,
              "model": dict(name=s.model, desc=describe(s.model), dtype=s.dtype,
                            weight_bytes=weight_bytes(model_dir, s.dtype), **c),
              "timings": [asdict(t) for t in timings], "kv": asdict(kv), "ttft_hits": hits,
              "llamacpp": llamacpp}
    result["targets"] = targets(result)
    return result


# ---- results ------------------------------------------------------------------------------------

def _pick(result: dict, what: str, engine: str = "seqpar", size: int | None = None) -> dict | None:
    return next((t for t in result["timings"] if t["what"] == what and t["engine"] == engine
                 and (size is None or t["size"] == size)), None)


def _status(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, met / missed / not measured, numbers) for issue 11's targets."""
    out = []
    for t in (x for x in result["timings"] if x["what"] == "decode" and x["engine"] == "seqpar"):
        hf = _pick(result, "decode", "hf", t["size"])
        want = TARGETS["decode_batch1"] if t["size"] == 1 else TARGETS["decode_batched"]
        name = f"decode batch {t['size']} >= {want}x HF tok/s"
        if hf is None:
            out.append((name, "not measured", ""))
            continue
        # rounds paired: HF's decode time of round r over seqpar's of round r
        paired = statistics.median(h / x for x, h in zip(t["times_s"], hf["times_s"]))
        out.append((name, _status(paired >= want),
                    f"{paired:.2f}x ({t['rate']:.1f} vs {hf['rate']:.1f} tok/s median; best "
                    f"{t['best_rate']:.1f} vs {hf['best_rate']:.1f})"))
    bw, one = _pick(result, "bandwidth", "torch"), _pick(result, "decode", size=1)
    if bw and one:
        steps = result["settings"]["new_tokens"] - 1
        roof = result["model"]["weight_bytes"] / bw["rate"]
        step = one["median_s"] / steps
        out.append((f"batch-1 decode step <= {TARGETS['roofline']}x the roofline",
                    _status(step <= TARGETS["roofline"] * roof),
                    f"{step / roof:.1f}x: step {step * 1e3:.1f} ms (best "
                    f"{one['min_s'] / steps * 1e3:.1f}) vs "
                    f"{result['model']['weight_bytes'] / 1e6:.0f} MB / {bw['rate'] / 1e9:.1f} GB/s "
                    f"= {roof * 1e3:.1f} ms"))
    pre, mm = _pick(result, "prefill"), _pick(result, "matmul", "torch")
    if pre and mm:
        frac = pre["rate"] / mm["rate"]
        out.append((f"prefill {pre['size']} tokens >= {TARGETS['prefill_matmul']} of the matmul "
                    "rate", _status(frac >= TARGETS["prefill_matmul"]),
                    f"{frac:.2f}: {pre['work'] / 1e9:.0f} GFLOP in {pre['median_s']:.2f} s = "
                    f"{pre['rate'] / 1e9:.0f} GFLOP/s vs F.linear {mm['rate'] / 1e9:.0f} GFLOP/s"))
    hit, new = _pick(result, "ttft_cached"), _pick(result, "ttft_uncached")
    if hit and new:
        paired = statistics.median(a / b for a, b in zip(hit["times_s"], new["times_s"]))
        out.append((f"cached-prefix TTFT <= {TARGETS['ttft_cached']}x uncached",
                    _status(paired <= TARGETS["ttft_cached"]),
                    f"{paired:.2f}x: {hit['median_s'] * 1e3:.1f} vs {new['median_s'] * 1e3:.1f} ms"
                    f" ({result['settings']['prefix_len']} of {hit['size']} tokens cached; "
                    f"{result['ttft_hits']['prefix_hits']} prefix-hit tokens counted)"))
    kv = result["kv"]
    out.append(("KV memory per rank = formula", _status(kv["matches"]),
                f"{kv['num_blocks']} blocks x {kv['block_bytes']} B = {kv['pool_bytes']} B; "
                f"formula {kv['budget_bytes']} // {kv['block_bytes']} = {kv['formula_blocks']} "
                "blocks"))
    lc = result["llamacpp"]
    names = ("batch-1 decode >= llama.cpp tok/s (F16 GGUF)",
             f"prefill {result['settings']['prefill_tokens']} tokens >= 2x faster than llama.cpp")
    if lc["status"] != "measured":
        out += [(name, lc["status"], lc["reason"]) for name in names]
        return out
    mine, theirs = _pick(result, "decode", size=1), _pick(result, "decode", "llama.cpp", 1)
    if mine and theirs:
        out.append((names[0], _status(mine["rate"] >= theirs["rate"]),
                    f"{mine['rate']:.1f} vs {theirs['rate']:.1f} tok/s median (best "
                    f"{mine['best_rate']:.1f} vs {theirs['best_rate']:.1f})"))
    mine, theirs = _pick(result, "prefill"), _pick(result, "prefill", "llama.cpp")
    if mine and theirs:
        speedup = theirs["median_s"] / mine["median_s"]
        out.append((names[1], _status(speedup >= 2.0), f"{speedup:.2f}x: "
                    f"{mine['median_s']:.3f} vs {theirs['median_s']:.3f} s median"))
    return out


TABLE_HEAD = ["what", "engine", "size", "median s", "min s", "rate (median)", "rate (best)"]


def _rate(t: dict, which: str) -> str:
    v = t[which]
    if t["unit"] == "B":
        return f"{v / 1e9:.1f} GB/s"
    if t["unit"] == "FLOP":
        return f"{v / 1e9:.4g} GFLOP/s"
    return f"{v:.1f} tok/s"


def rows(result: dict) -> list[list[str]]:
    return [[t["what"], t["engine"], str(t["size"]), f"{t['median_s']:.4f}", f"{t['min_s']:.4f}",
             _rate(t, "rate"), _rate(t, "best_rate")] for t in result["timings"]]


def summary(result: dict) -> str:
    from seqpar_bench.results import _text_table
    m = result["machine"]
    lines = [_text_table(TABLE_HEAD, rows(result)), "",
             f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {m['wall_s']:.0f} s; "
             f"load average {m['load_avg_before'][0]} before, {m['load_avg_after'][0]} after; "
             f"other processes used {m['other_share']:.0%} of the CPUs meanwhile"]
    lines += [f"[{status}] {name}: {nums}" for name, status, nums in result["targets"]]
    return "\n".join(lines)




def section(result: dict) -> str:
    """The docs/benchmarks.md section of this run, between its markers."""
    from seqpar_bench.markdown import ENGINE_BEGIN, ENGINE_END, _table
    m, s, mo = result["machine"], result["settings"], result["model"]
    shared = m["other_share"] > 0.05 or max(m["load_avg_before"][0], m["load_avg_after"][0]) > 1.5
    L = [ENGINE_BEGIN, "## Engine core (issue 11)", "",
         f"This run: `{result['command']}`, {m['wall_s'] / 60:.1f} minutes, "
         f"{time.strftime('%Y-%m-%d', time.gmtime())}. "
         f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
         f"{m['transformers']}; {s['threads']} threads for each engine. Load average "
         f"{m['load_avg_before'][0]} before and {m['load_avg_after'][0]} after; other processes "
         f"used {m['other_share']:.0%} of the CPUs while it ran. "
         + ("**The machine was shared with other jobs**: absolute numbers are low and noisy "
            "(run-to-run spread here is 10-40% even when idle); alternation keeps the decode "
            "ratios fair." if shared else "The machine was otherwise idle."), "",
         f"`{mo['name']}` = {mo['desc']}, tp=1, {mo['dtype']} in both engines, "
         f"{mo['weight_bytes'] / 1e6:.0f} MB of weights. {s['warmup']} warm-up + {s['rounds']} "
         f"measured rounds; median and min. Decode: {s['prompt_len']}-token prompts, "
         f"{s['new_tokens']} new tokens, greedy; the {s['new_tokens'] - 1} decode steps timed (a "
         "1-token generate subtracted), seqpar and HF `generate` (its KV cache) in alternation. "
         f"TTFT: {s['prefix_len'] + s['tail_len']}-token prompts, max_tokens=1; uncached: a fresh "
         f"{s['prefix_len']}-token prefix; cached: the same prefix right after, another tail. "
         f"Prefill: {s['prefill_tokens']} new tokens, max_tokens=1; its matmul FLOPs (projections, "
         f"MLP, causal attention, one LM-head row) per second against F.linear on "
         f"[{s['prefill_tokens']}, {mo['hidden']}] x [{mo['hidden']}, {mo['inter']}]. "
         f"Bandwidth: a sum over a {s['bandwidth_bytes'] / GiB:g} GiB float32 tensor. Roofline: "
         "weight bytes / bandwidth.", ""]
    L += _table(["target", "status", "numbers"], result["targets"])
    L += ["", *_table(TABLE_HEAD, rows(result)), "", ENGINE_END]
    return "\n".join(L)


def write_section(result: dict, path) -> None:
    """Put this run's section into the page at `path`: in place of the last one, else at the end
    (`seqpar bench --markdown` keeps it there when it rewrites the rest)."""
    import re
    from seqpar_bench.markdown import ENGINE_BEGIN, ENGINE_END
    path = Path(path)
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.escape(ENGINE_BEGIN) + r".*?" + re.escape(ENGINE_END)
    new = section(result)
    if re.search(pattern, old, re.S):
        text = re.sub(pattern, lambda _: new, old, count=1, flags=re.S)
    else:
        text = old.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)


def parse(argv=None) -> argparse.Namespace:
    d = EngineSettings()
    p = argparse.ArgumentParser(prog="seqpar bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="a seqpar --model form (default smollm2)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help="both engines' dtype (default bfloat16, this CPU's fast path)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads of each engine")
    p.add_argument("--batches", type=int, nargs="+", default=d.batches, help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="decode prompt tokens")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="tokens generated per sequence when decoding (>= 2)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="measured rounds (>= 1)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up rounds, discarded")
    p.add_argument("--prefix-len", type=int, default=d.prefix_len,
                   help=f"TTFT: cached prefix tokens (a multiple of {BLOCK_SIZE})")
    p.add_argument("--tail-len", type=int, default=d.tail_len, help="TTFT: tokens after it")
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens,
                   help="tokens of the prefill timed against the matmul rate")
    p.add_argument("--bandwidth-bytes", type=int, default=d.bandwidth_bytes,
                   help="size of the tensor the bandwidth probe sums")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV budget per rank (default: what the largest step needs + half a block)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--json", metavar="FILE", help="write the run (records, machine) as JSON")
    p.add_argument("--markdown", metavar="FILE",
                   help="put the results section into this page (docs/benchmarks.md)")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.rounds < 1 or args.prefix_len % BLOCK_SIZE:
        p.error(f"need --new-tokens >= 2 (got {args.new_tokens}), --rounds >= 1 (got "
                f"{args.rounds}), --prefix-len a multiple of {BLOCK_SIZE} (got {args.prefix_len})")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    s = EngineSettings(**{k: v for k, v in vars(args).items() if k not in ("json", "markdown")})
    result = run(s)
    result["command"] = "seqpar bench engine " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result["command"] = result["command"].strip()
    print()
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        write_section(result, args.markdown)
        print(f"wrote {args.markdown}")
    return 0
