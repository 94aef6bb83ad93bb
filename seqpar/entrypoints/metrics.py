"""Prometheus metrics of `seqpar serve` (names after vLLM's, under a `seqpar:` prefix).

Latency histograms are observed on the event loop as each step's outputs arrive there, so they
include the server's own overhead; the engine's counters and gauges are read on the engine
thread when /metrics is scraped (see snapshot) and exposed as they are.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from seqpar.distributed.collectives import Collective
from seqpar.spec.speculator import spec_stats

# Seconds; fine steps below 100 ms where CPU decode steps of tiny and small models fall.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                    0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def snapshot(engine) -> dict:
    """The engine's counters and gauges; call on the engine thread."""
    cache = engine.cache_stats()
    comm = engine.comm_stats()
    spec = spec_stats(engine)
    return {
        "running": engine.num_running(), "waiting": engine.num_waiting(),
        "kv_usage": cache["used_blocks"] / max(cache["num_blocks"], 1),
        "prompt_tokens": engine.stats["prompt_tokens"],
        "generation_tokens": engine.stats["generation_tokens"],
        "preemptions": cache["preemptions"], "prefix_queries": cache["prefix_queries"],
        "prefix_hits": cache["prefix_hits"],
        "sp_steps": comm["steps"]["sp"], "tp_steps": comm["steps"]["tp"],
        "spec_draft_tokens": spec["num_draft_tokens"],
        "spec_accepted_tokens": spec["num_accepted_tokens"],
        "comm": {op.value: comm[op.value] for op in Collective},
    }


class _EngineCollector:
    """Exposes the last snapshot; the /metrics handler refreshes it just before rendering."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.last: dict | None = None

    def collect(self):
        s = self.last
        if s is None:
            return
        label = {"model_name": self.model_name}

        def family(kind, name, doc, value):
            metric = kind(name, doc, labels=list(label))
            metric.add_metric(list(label.values()), value)
            return metric

        yield family(GaugeMetricFamily, "seqpar:num_requests_running",
                     "Requests in the running batch", s["running"])
        yield family(GaugeMetricFamily, "seqpar:num_requests_waiting",
                     "Requests waiting to be admitted", s["waiting"])
        yield family(GaugeMetricFamily, "seqpar:kv_cache_usage_perc",
                     "Fraction of KV cache blocks in use (0..1)", s["kv_usage"])
        for key, name, doc in (
                ("prompt_tokens", "prompt_tokens", "Prompt tokens prefilled"),
                ("generation_tokens", "generation_tokens", "Tokens generated"),
                ("preemptions", "num_preemptions", "Sequences preempted (recomputed later)"),
                ("prefix_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                ("prefix_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
                ("sp_steps", "sp_steps", "Engine steps run with sequence parallelism"),
                ("tp_steps", "tp_steps", "Engine steps run with plain tensor parallelism"),
                ("spec_draft_tokens", "spec_decode_num_draft_tokens",
                 "Speculative tokens proposed and verified"),
                ("spec_accepted_tokens", "spec_decode_num_accepted_tokens",
                 "Speculative tokens the target accepted")):
            yield family(CounterMetricFamily, f"seqpar:{name}", doc, s[key])
        for unit in ("bytes", "calls"):
            metric = CounterMetricFamily(f"seqpar:comm_{unit}", f"Communication {unit} on rank 0, "
                                         "by collective", labels=["model_name", "collective"])
            for op, counts in s["comm"].items():
                metric.add_metric([self.model_name, op], counts[unit])
            yield metric


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # no `_created` series: they only double the scrape
        self.registry = CollectorRegistry()
        self.engine = _EngineCollector(model_name)
        self.registry.register(self.engine)
        labels = ["model_name"]
        hist = lambda name, doc: Histogram(name, doc, labels, registry=self.registry,  # noqa: E731
                                           buckets=_LATENCY_BUCKETS).labels(model_name)
        self.ttft = hist("seqpar:time_to_first_token_seconds",
                         "From the request's arrival to its first token on the server")
        self.itl = hist("seqpar:inter_token_latency_seconds", "Between a request's tokens")
        self.e2e = hist("seqpar:e2e_request_latency_seconds",
                        "From a request's arrival to its last token")
        self.step = hist("seqpar:engine_step_seconds",
                         "Wall time of one engine step (on the engine thread)")
        self._finished = Counter("seqpar:request_success", "Requests finished, by reason",
                                 labels + ["finished_reason"], registry=self.registry)
        self._model = model_name

    def on_output(self, route, out, now: float) -> None:
        """One engine delta for `route` (async_engine._Route) arrived on the loop at `now`."""
        new = len(out.token_ids)
        if new > 0:
            if route.tokens == 0:
                self.ttft.observe(now - route.arrival)
            else:
                gap = (now - route.last) / new
                for _ in range(new):
                    self.itl.observe(gap)
            route.tokens, route.last = route.tokens + new, now
        if out.finished:
            self.e2e.observe(now - route.arrival)
            self._finished.labels(self._model, out.finish_reason).inc()

    def on_step(self, seconds: float) -> None:
        self.step.observe(seconds)

    def render(self, snap: dict | None) -> bytes:
        self.engine.last = snap
        return generate_latest(self.registry)
