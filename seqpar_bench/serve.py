"""`seqpar bench serve`: a load client for `seqpar serve` (after `vllm bench serve`).

Sends --num-prompts streaming completions of random token-id prompts (--input-len tokens, exactly
--output-len generated: ignore_eos) at a Poisson --request-rate, or all at once under
--max-concurrency, and reports TTFT, TPOT and ITL percentiles, request and output-token
throughput, and the server's own engine step time (from /metrics: ITL minus step time is the
server's overhead per token). Against --url it measures that server; otherwise it starts one
`seqpar serve` per --sp mode (off / auto / on) on the same load, in turn, and can run the same
requests through the offline LLM.generate for comparison (--offline).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0


def one_request(url: str, prompt: list[int], output_len: int, api_key: str | None,
                timeout: float) -> Result:
    """One streaming completion; times each chunk (the server sends one per generated token)."""
    res = Result()
    parts = urllib.parse.urlsplit(url)
    body = json.dumps({"prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", parts.path.rstrip("/") + "/v1/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return res
        last = None
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.error = chunk["error"]["message"]
                return res
            now = time.perf_counter()
            if chunk.get("usage"):
                res.output_tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            if last is None:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no usage chunk"
    except (OSError, http.client.HTTPException, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def run_load(url: str, prompts: list[list[int]], output_len: int, rate: float | None,
             concurrency: int | None, api_key: str | None, seed: int,
             timeout: float = 600.0) -> tuple[list[Result], float]:
    """Send every prompt: at Poisson times of `rate` per second (None: all at once), at most
    `concurrency` in flight (None: no bound). Returns (results, wall seconds)."""
    rng = np.random.default_rng(seed)
    gaps = (rng.exponential(1.0 / rate, len(prompts)) if rate else np.zeros(len(prompts)))
    gate = threading.Semaphore(concurrency or len(prompts))

    def task(prompt):
        try:
            return one_request(url, prompt, output_len, api_key, timeout)
        finally:
            gate.release()

    start = time.perf_counter()
    with ThreadPoolExecutor(min(len(prompts), concurrency or len(prompts))) as pool:
        futures, due = [], start
        for prompt, gap in zip(prompts, gaps):
            due += gap
            time.sleep(max(0.0, due - time.perf_counter()))
            gate.acquire()
            futures.append(pool.submit(task, prompt))
        results = [f.result() for f in futures]
    return results, time.perf_counter() - start


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: ({f"p{q}": float(np.percentile(xs, q)) * 1e3 for q in (50, 90, 99)}  # noqa: E731
                     | {"mean": float(np.mean(xs)) * 1e3}) if len(xs) else None
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    tokens = sum(r.output_tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:3],
            "duration_s": wall, "request_throughput": len(ok) / wall,
            "output_throughput": tokens / wall, "ttft_ms": ms([r.ttft for r in ok]),
            "tpot_ms": ms(tpot), "itl_ms": ms([x for r in ok for x in r.itl])}


def scrape_step_time(url: str) -> tuple[float, float]:
    """(sum, count) of the server's seqpar:engine_step_seconds histogram."""
    from prometheus_client.parser import text_string_to_metric_families
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return (values.get("seqpar:engine_step_seconds_sum", 0.0),
            values.get("seqpar:engine_step_seconds_count", 0.0))


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from [10, vocab), away from the usual special tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(10, vocab, size=(n, length)).tolist()


class ServerUnderTest:
    """`seqpar serve` in a child process on a free loopback port, until stop()."""

    def __init__(self, model: str, sp: str, serve_args: list[str], log_path: str):
        from seqpar.distributed.launch import free_port  # a process helper, no engine state
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log_path, "w")
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "seqpar.cli", "serve", model,
                                      "--port", port, "--sp", sp, *serve_args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server for --sp {sp} did not come up; see {log_path}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        parts = urllib.parse.urlsplit(self.url)
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


ALIASES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "q": "quantization",
           "sp": "sequence_parallel"}
"""`seqpar serve`'s short flags and their EngineArgs fields."""
SERVER_ONLY = {"host", "port", "api_key", "served_model_name", "max_waiting",
               "enable_auto_tool_choice", "tool_call_parser"}
"""`seqpar serve` flags with no engine meaning: the offline run ignores them."""


def engine_options(model: str, sp: str, serve_args: list[str]) -> dict:
    """LLM(**options) for the same engine `seqpar serve MODEL --sp SP *serve_args` starts: each
    `--flag value` (or a bare `--flag`: True) mapped onto the EngineArgs field of that name, with
    the field's type. An unknown flag is an error, not dropped."""
    import dataclasses
    import typing

    from seqpar.engine.args import EngineArgs
    hints = typing.get_type_hints(EngineArgs)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    out = {"model": model, "sequence_parallel": sp}
    i = 0
    while i < len(serve_args):
        flag = serve_args[i]
        name = flag.lstrip("-").replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields  # --no-enable-prefix-caching
        name = ALIASES.get(name[3:] if negated else name, name[3:] if negated else name)
        if not flag.startswith("-") or (name not in fields and name not in SERVER_ONLY):
            raise ValueError(f"--serve-args: {flag!r} is no `seqpar serve` engine flag "
                             f"(EngineArgs fields: {', '.join(sorted(fields))})")
        has_value = (not negated and i + 1 < len(serve_args)
                     and not serve_args[i + 1].startswith("--"))
        value = serve_args[i + 1] if has_value else None
        i += 2 if has_value else 1
        if name in SERVER_ONLY:
            continue
        if value is None:  # a switch: --overlap, --compile, --no-enable-prefix-caching
            out[name] = not negated
        else:
            kind = hints[name]
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            out[name] = None if value == "None" else base(value)
    return out


def offline_throughput(model: str, sp: str, serve_args: list[str], prompts, output_len) -> dict:
    """The same requests through LLM.generate in this process: output tokens per second."""
    from seqpar import LLM, SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    with LLM(**engine_options(model, sp, serve_args)) as llm:
        llm.generate([prompts[0]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        # Driven from a thread of its own, as the server drives its engine: on a busy CPU,
        # OpenMP's spinning workers slow the main thread's steps many times over (unless
        # OMP_WAIT_POLICY=PASSIVE), which would flatter the server.
        start = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            outs = pool.submit(llm.generate, [{"prompt_token_ids": p} for p in prompts],
                               params).result()
        wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"duration_s": wall, "output_throughput": tokens / wall}


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"),
                              ("time to first token", "time per output token",
                               "inter-token latency")):
        for color, mode in enumerate(dict.fromkeys(r["mode"] for r in records)):
            rows = [r for r in records if r["mode"] == mode and r[key]]
            x = [r["request_throughput"] for r in rows]
            ax.plot(x, [r[key]["p50"] for r in rows], "o-", color=f"C{color}", label=f"{mode} p50")
            ax.plot(x, [r[key]["p99"] for r in rows], "x--", color=f"C{color}",
                    label=f"{mode} p99")
        ax.set(title=title, xlabel="achieved requests / s", ylabel="ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000); default: start "
                                 "one per --sp mode")
    p.add_argument("--model", default="smollm2", help="model to serve (when starting servers)")
    p.add_argument("--sp", nargs="+", default=["off", "auto", "on"], choices=["off", "auto", "on"],
                   help="modes to compare, one server each (not with --url)")
    p.add_argument("--serve-args", default="",
                   help="more `seqpar serve` flags, one string (e.g. \"-tp 2 --dtype bfloat16\")")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per load point")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    p.add_argument("--request-rate", type=float, nargs="+", default=None,
                   help="Poisson request rates per second, one load point each (default: all "
                        "requests at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (e.g. 32 clients)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt ids are drawn below this (default: the model's vocab size)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--offline", action="store_true",
                   help="also time LLM.generate on the same requests (per mode)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first, not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write every load point as JSON")
    p.add_argument("--plot", metavar="FILE", help="write latency against request rate (png)")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.url and args.offline:
        p.error("--offline needs the model: use it without --url")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    vocab = args.vocab_size
    if vocab is None:
        if args.url:
            raise ValueError("with --url, give --vocab-size (the served model's)")
        from seqpar.config import ModelConfig
        from seqpar.loader.resolve import resolve_model
        vocab = ModelConfig.from_dir(resolve_model(args.model)).vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    serve_args = shlex.split(args.serve_args)
    rates = args.request_rate or [None]
    records = []
    for mode in (["server"] if args.url else args.sp):
        server = None if args.url else ServerUnderTest(args.model, mode, serve_args,
                                                       f"bench-serve-{mode}.log")
        url = args.url or server.url
        try:
            warm = random_prompts(args.warmup, args.input_len, vocab, args.seed + 1)
            if warm:
                run_load(url, warm, args.output_len, None, None, args.api_key, args.seed)
            for rate in rates:
                steps_before = scrape_step_time(url)
                results, wall = run_load(url, prompts, args.output_len, rate,
                                         args.max_concurrency, args.api_key, args.seed)
                steps_after = scrape_step_time(url)
                rec = {"mode": mode, "request_rate": rate, "max_concurrency": args.max_concurrency,
                       "num_prompts": args.num_prompts, "input_len": args.input_len,
                       "output_len": args.output_len, **summarize(results, wall)}
                count = steps_after[1] - steps_before[1]
                rec["engine_step_ms"] = ((steps_after[0] - steps_before[0]) / count * 1e3
                                         if count else None)
                records.append(rec)
                print(_line(rec), flush=True)
        finally:
            if server is not None:
                server.stop()
        if args.offline:
            off = offline_throughput(args.model, mode, serve_args, prompts, args.output_len)
            for rec in records:
                if rec["mode"] == mode:
                    rec["offline_output_throughput"] = off["output_throughput"]
            print(f"{mode:>6} offline LLM.generate: {off['output_throughput']:.1f} tok/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            command = shlex.join(argv if argv is not None else sys.argv[1:])
            json.dump({"command": f"seqpar bench serve {command}",
                       "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["failed"] == 0 for r in records) else 1


def _line(r: dict) -> str:
    rate = "all at once" if r["request_rate"] is None else f"{r['request_rate']:g} req/s"
    lat = lambda k: "-" if not r[k] else f"{r[k]['p50']:.1f}/{r[k]['p90']:.1f}/{r[k]['p99']:.1f}"  # noqa: E731
    step = "-" if r["engine_step_ms"] is None else f"{r['engine_step_ms']:.2f}"
    return (f"{r['mode']:>6} {rate:>12}: {r['completed']} ok, {r['failed']} failed; "
            f"{r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} tok/s; "
            f"ms p50/p90/p99 TTFT {lat('ttft_ms')} TPOT {lat('tpot_ms')} ITL {lat('itl_ms')}; "
            f"engine step {step} ms" + (f"; errors: {r['errors']}" if r["errors"] else ""))
