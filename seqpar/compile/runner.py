"""compile=True: one rank's compiled forward for Llama-family models.

The model's own layers run inside torch.compile with a TP plan: row-parallel layers and the
embedding then end with a functional all_reduce and the `tokenwise_begin` fence, column-parallel
layers start with `tokenwise_end` (see layers/linear.py, layers/embedding.py). Attention over the
KV cache, a Python loop over the step's sequences, is the opaque op `seqpar::attention`, so the
whole forward, from the token ids to the last residual stream, is one graph with no graph break;
the SP pass (sp_pass.py) turns its all_reduces into reduce_scatter / all_gather.

Token counts: the ids go in as [N, S] (S = T_pad / N, T_pad = T rounded up to a multiple of N, the
same padding as eager SP), with S dynamic, so the graph's T is N * S and divides by N exactly; one
graph serves every count (S = 1 is specialised by Dynamo once, so at most two graphs). On TP
(sp=False) the ids go in as [1, T], T dynamic: again at most two graphs.

The graph returns the residual stream (h, residual); when the pass sharded it ([S, H] on each
rank), the sampled rows are normed and gathered as in eager SP, else as in eager TP.

A rank serves every step compiled (CompiledModel): the policy picks TP, SP or SP + overlap per
step, and each kind has a CompiledForward of its own, built on the first step of that kind.
"""
from __future__ import annotations

import functools
import logging
import time
import types

import torch
import torch.nn.functional as F

from seqpar.compile import ops
from seqpar.compile.backend import SPBackend

log = logging.getLogger("seqpar")


class _TPPlan:
    """What the layers read from a plan inside the graph: always a TP step (the pass makes SP)."""
    sp = False
    overlap = False


TP_PLAN = _TPPlan()


class CompiledForward:
    """Drop-in for `model(plan)` on one rank: float32 logits [S, V] on rank 0, None elsewhere."""

    def __init__(self, model, sp: bool = True, inductor: bool = True, overlap: bool = False):
        """sp: run the SP pass; overlap: with it, collective matmuls (layers/overlap.py)."""
        self.model, self.comm = model, model.comm
        self.sp = sp and self.comm.world_size > 1
        self.kind = ("SP + overlap" if overlap else "SP") if self.sp else "TP"
        self.backend = SPBackend(sp=self.sp, shard_outputs=True, inductor=inductor,
                                 overlap=overlap and self.sp)
        # Dynamo caches compiled code per code object, up to a recompile limit: each instance gets
        # its own copy of _graph's code, so the kinds of step of one LLM, and LLMs built one after
        # another in a process, never share (or exhaust) one cache.
        graph = types.FunctionType(CompiledForward._graph.__code__.replace(), globals(), "_graph")
        self._compiled = torch.compile(types.MethodType(graph, self), backend=self.backend,
                                       fullgraph=True)
        self.compile_s = 0.0
        """Wall time of the calls that compiled (Dynamo + the pass + Inductor)."""
        self.steps = 0
        """Steps this forward ran."""

    def _graph(self, ids: torch.Tensor):
        """ids [N, S] or [1, T] -> the residual stream (h, residual) after the last layer."""
        model = self.model.model
        h = model.embed_tokens(ids.reshape(-1), TP_PLAN)
        residual = None
        for i, layer in enumerate(model.layers):
            if residual is None:
                h, residual = layer.input_layernorm(h), h
            else:
                h, residual = layer.input_layernorm(h, residual)
            attn = layer.self_attn
            qkv = attn.qkv_proj(h, TP_PLAN)
            h = attn.o_proj(ops.attention(qkv, i, attn.o_proj.in_per_rank), TP_PLAN)
            h, residual = layer.post_attention_layernorm(h, residual)
            h = layer.mlp(h, TP_PLAN)
        return h, residual

    @torch.inference_mode()
    def __call__(self, plan) -> torch.Tensor | None:
        n = self.comm.world_size
        t = plan.num_tokens
        if plan.sp != self.sp:
            raise ValueError(f"a step with sp={plan.sp} sent to the compiled {self.kind} forward")
        if self.sp:
            rows = plan.padded
            ids = F.pad(plan.token_ids, (0, rows - t)).view(n, rows // n)
        else:
            rows = t
            ids = plan.token_ids.view(1, t)
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        for i, layer in enumerate(self.model.model.layers):
            ops.ATTENTION[i] = functools.partial(_attend, layer.self_attn, plan, rows)
        graphs = len(self.backend.graphs)
        start = time.perf_counter()
        try:
            h, residual = self._compiled(ids)
        finally:
            ops.ATTENTION.clear()
        if len(self.backend.graphs) != graphs:
            spent = time.perf_counter() - start
            self.compile_s += spent
            log.info(f"seqpar: compiled the {self.kind} forward in {spent:.1f} s")
        self.steps += 1
        self._count(rows)
        if h.shape[0] != residual.shape[0]:  # one of them sharded, the other left TP
            h, residual = (self.comm.all_gather_tokens(y)[:rows] if y.shape[0] != rows else y
                           for y in (h, residual))
        sharded = h.shape[0] != rows
        norm = self.model.model.norm
        if sharded:  # [T_pad / N, H] on this rank: as eager SP
            local = plan.local_sample_rows(self.comm.rank)
            x, _ = norm(h[local], residual[local])
            x = self.comm.all_gather_tokens(x)[plan.sample_gather_index]
        else:
            sample = plan.sample_rows
            x, _ = norm(h[sample], residual[sample])
        logits = self.model.lm_head(x)
        return None if logits is None else logits.float()

    def _count(self, rows: int) -> None:
        """Account the graph's collectives in the rank's Comm stats, as eager steps are."""
        for op, row_bytes in self.backend.collectives.items():
            for b in row_bytes:
                self.comm._count(op, rows * b)

    @property
    def report(self):
        """The pass's report of the last graph compiled (None before the first step)."""
        return self.backend.reports[-1] if self.backend.reports else None


class CompiledModel:
    """Drop-in for `model(plan)` on one rank with compile=True: every step runs compiled, on the
    CompiledForward of its kind (TP, SP, SP + overlap), so the policy's choice per step holds.
    Each is built on the first step of its kind: a kind the policy never picks costs no compile."""

    def __init__(self, model, inductor: bool = True):
        self.model, self.inductor = model, inductor
        self.forwards: dict[tuple[bool, bool], CompiledForward] = {}
        """(sp, overlap) of a step -> its compiled forward."""

    def __call__(self, plan) -> torch.Tensor | None:
        key = (plan.sp, plan.sp and plan.overlap)
        if key not in self.forwards:
            self.forwards[key] = CompiledForward(self.model, sp=key[0], inductor=self.inductor,
                                                 overlap=key[1])
        return self.forwards[key](plan)

    @property
    def compile_s(self) -> float:
        """Seconds this rank spent compiling, every kind together."""
        return sum(f.compile_s for f in self.forwards.values())


def _attend(attn, plan, rows: int, qkv: torch.Tensor) -> torch.Tensor:
    """LlamaAttention.attend on the step's T real tokens: qkv [rows, ...] -> [rows, hq * D],
    pad rows zero."""
    t = plan.num_tokens
    out = attn.attend(qkv[:t], plan)  # [T, hq * D]
    return F.pad(out, (0, 0, 0, rows - t)) if rows > t else out


def check_single_stage(pipeline_parallel_size: int) -> None:
    """compile=True covers one pipeline stage: say so before any rank starts."""
    if pipeline_parallel_size > 1:
        raise ValueError(
            f"compile=True with pipeline_parallel_size={pipeline_parallel_size}: the compiled "
            "forward runs the whole model as one stage (token ids in, sampled logits out); a later "
            "stage's input on an SP step arrives already sharded, which the SP pass does not take. "
            "Use pipeline_parallel_size=1 or compile=False")
