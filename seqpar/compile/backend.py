"""The torch.compile backend: the SP pass on Dynamo's graph, then Inductor.

    backend = SPBackend(shard_outputs=True)
    fn = torch.compile(fn, backend=backend, fullgraph=True)

After each compile `backend.reports` holds the pass's report of that graph and `backend.collectives`
the collectives left in it (for byte accounting); the summary is logged once per graph.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn.functional as F

from seqpar.compile.sp_pass import PassReport, _C10D, sequence_parallel_pass

log = logging.getLogger("seqpar")

_COLLECTIVES = {_C10D.all_reduce.default: "all_reduce",
                _C10D.reduce_scatter_tensor.default: "reduce_scatter",
                _C10D.all_gather_into_tensor.default: "all_gather",
                torch.ops.seqpar.all_gather_matmul.default: "all_gather_ring",
                torch.ops.seqpar.matmul_reduce_scatter.default: "reduce_scatter_ring"}


class SPBackend:
    """A torch.compile backend. sp=False: Inductor only (compiled TP; fences still removed)."""

    def __init__(self, sp: bool = True, shard_outputs: bool = False, inductor: bool = True,
                 overlap: bool = False):
        self.sp, self.shard_outputs, self.inductor = sp, shard_outputs, inductor
        self.overlap = overlap
        self.reports: list[PassReport] = []
        self.graphs: list[fx.GraphModule] = []
        self.collectives: dict[str, list[int]] = {}
        """op -> bytes per token row of each call in the last graph (payload at T_pad rows)."""

    def __call__(self, gm: fx.GraphModule, example_inputs):
        if self.sp:
            report = sequence_parallel_pass(gm, self.shard_outputs, overlap=self.overlap)
        else:
            report = sequence_parallel_pass(gm, shard_outputs=False, rewrite=False)
        self.reports.append(report)
        self.graphs.append(gm)
        self.collectives = _collectives(gm)
        log.info(report.summary())
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def _collectives(gm: fx.GraphModule) -> dict[str, list[int]]:
    """Per collective kind, the bytes per token row of each call (feature size x element size)."""
    out: dict[str, list[int]] = {}
    for n in gm.graph.nodes:
        target = n.target
        if isinstance(target, torch._ops.OpOverloadPacket):
            target = target.default  # Dynamo records all_reduce so; the pass inserts overloads
        kind = _COLLECTIVES.get(target) if n.op == "call_function" else None
        if kind is None:
            continue
        arg = n.args[0]
        if isinstance(arg, fx.Node) and "example_value" not in arg.meta and arg.target is F.pad:
            arg = arg.args[0]  # the pass's pad before a reduce_scatter: same row size
        x = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
        row = 0 if x is None else int(torch.Size(x.shape[1:]).numel()) * x.element_size()
        if kind == "reduce_scatter_ring" and x is not None:  # payload: the [T_pad, out] sum
            w = n.args[1].meta.get("example_value")
            row = 0 if w is None else w.shape[0] * x.element_size()
        out.setdefault(kind, []).append(row)
    return out
