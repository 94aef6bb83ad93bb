"""compile=True: one rank's compiled forward for Llama-family models.

torch.compile traces the model's own `hidden_states` (models/llama.py: the embedding and the
decoder layers, the code eager steps run) with a GraphPlan: a TP step over the graph's token ids
and their positions, nothing else. Comm then emits its collectives as custom ops
(distributed/ops.py: the group's own transport) and the fences of ops.py; each layer's `attn`
(layers/attention.py: the KV cache writes and SDPA, laid out by the step's block tables) is the
opaque op `seqpar::attention`, whose eager body reads the step's plan outside the graph. The rest
of attention (the qkv split, q/k norms, rotary) is traced and fused like the other token-wise
ops. So the whole stream, from the token ids to the last layer's residual, is one graph with no
graph break and no guard on the per-step plan; the SP pass (sp_pass.py) turns its all_reduces
into reduce_scatter / all_gather.

Token counts: the ids and positions go in as [N, S] (S = T_pad / N, T_pad = T rounded up to a
multiple of N, the same padding as eager SP), with S dynamic, so the graph's T is N * S and
divides by N exactly; one graph serves every count (S = 1 is specialised by Dynamo once, so at
most two graphs). On TP (sp=False) they go in as [1, T], T dynamic: again at most two graphs.

The graph returns the residual stream (h, residual), as the pass left it: sharded [S, H] on an SP
step (shard_outputs), or whole where a region stayed TP (each rank then keeps its own rows, no
transfer). The model's own tail (`logits`: final norm and LM head on the sampled rows) runs after
it with the step's plan, eagerly, as on an eager step.

A rank serves every step compiled (CompiledModel): the policy picks TP, SP or SP + overlap per
step, and each kind has a CompiledForward of its own, built on the first step of that kind.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("seqpar")


class GraphPlan:
    """The plan the traced forward reads: a TP step over the graph's token ids (the SP pass makes
    the SP step). It holds no per-step lists, so Dynamo has nothing of the step to guard on."""
    sp = False
    overlap = False

    def __init__(self, token_ids: torch.Tensor, positions: torch.Tensor):
        self.token_ids = token_ids  # [T] (T_pad on an SP step)
        self.positions = positions  # [T] (pad rows: position 0)

    @property
    def num_tokens(self):
        return self.token_ids.shape[0]


class OpaqueAttention:
    """A layer's Attention module (layers/attention.py) as the traced forward sees it: the opaque
    op seqpar::attention for layer `index`. Set as the module's `forward` once (install); a call
    with a real step plan (an eager step) runs the class's own forward unchanged."""

    def __init__(self, module, index: int):
        self.eager = type(module).forward.__get__(module)
        self.index = index

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        if isinstance(plan, GraphPlan):
            from seqpar.compile import ops

            return ops.attention(q, k, v, self.index)  # [rows, hq * D]
        return self.eager(q, k, v, plan)

    @staticmethod
    def install(model) -> list["OpaqueAttention"]:
        """On every attention module of `model` (once); returns them in layer order."""
        out = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn.attn
            if not isinstance(attn.__dict__.get("forward"), OpaqueAttention):
                attn.forward = OpaqueAttention(attn, i)
            out.append(attn.forward)
        return out


class CompiledForward:
    """Drop-in for `model(plan)` on one rank: float32 logits [S, V] on rank 0, None elsewhere."""

    def __init__(self, model, sp: bool = True, inductor: bool = True, overlap: bool = False):
        """sp: run the SP pass; overlap: with it, collective matmuls (layers/overlap.py)."""
        from seqpar.compile.backend import SPBackend

        self.model, self.comm = model, model.comm
        self.sp = sp and self.comm.world_size > 1
        self.kind = ("SP + overlap" if overlap else "SP") if self.sp else "TP"
        self.attends = OpaqueAttention.install(model)
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

    def _graph(self, ids: torch.Tensor, positions: torch.Tensor):
        """ids, positions [N, S] or [1, T] -> the residual stream (h, residual) after the last
        layer."""
        return self.model.hidden_states(GraphPlan(ids.reshape(-1), positions.reshape(-1)))

    @torch.inference_mode()
    def __call__(self, plan) -> torch.Tensor | None:
        from seqpar.compile import ops

        n = self.comm.world_size
        t = plan.num_tokens
        if plan.sp != self.sp:
            raise ValueError(f"a step with sp={plan.sp} sent to the compiled {self.kind} forward")
        rows, shape = (plan.padded, (n, plan.padded // n)) if self.sp else (t, (1, t))
        ids, positions = (F.pad(x, (0, rows - t)).view(shape)
                          for x in (plan.token_ids, plan.positions))
        for x in (ids, positions):
            torch._dynamo.maybe_mark_dynamic(x, 1)
        ops.ATTEND[0] = functools.partial(_attend, self.attends, plan, rows)
        graphs = len(self.backend.graphs)
        start = time.perf_counter()
        try:
            with self._guards(graphs):
                h, residual = self._compiled(ids, positions)
        finally:
            ops.ATTEND[0] = None
        if len(self.backend.graphs) != graphs:
            spent = time.perf_counter() - start
            self.compile_s += spent
            log.info(f"seqpar: compiled the {self.kind} forward in {spent:.1f} s")
        self.steps += 1
        if self.sp:  # a region the pass left TP returns [T_pad, H]: keep this rank's rows
            shard = rows // n
            h, residual = (y if y.shape[0] == shard else y.narrow(0, self.comm.rank * shard, shard)
                           for y in (h, residual))
        return self.model.logits(plan, h, residual)

    @staticmethod
    def _guards(graphs: int):
        """Dynamo checks ~10 guards per layer on every call (the parameters' dtypes, shapes and
        strides, the modules' attributes), about 1 ms a step for 30 layers. Once both graphs
        this forward can have exist (one token per rank, and a dynamic count), nothing but the
        token count can pick between them, and nothing else changes between steps: Dynamo then
        checks only the guards that tell its cached graphs apart."""
        if graphs < 2:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

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


def _attend(attends: list[OpaqueAttention], plan, rows: int, layer: int, q: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s attention on the step's T real tokens: q [rows, hq, D], k, v [rows, hkv, D]
    -> [rows, hq * D], pad rows zero."""
    t = plan.num_tokens
    out = attends[layer].eager(q[:t], k[:t], v[:t], plan)  # [T, hq * D]
    return F.pad(out, (0, 0, 0, rows - t)) if rows > t else out


def check_single_stage(pipeline_parallel_size: int) -> None:
    """compile=True covers one pipeline stage: say so before any rank starts."""
    if pipeline_parallel_size > 1:
        raise ValueError(
            f"compile=True with pipeline_parallel_size={pipeline_parallel_size}: the compiled "
            "forward runs the whole model as one stage (token ids in, sampled logits out); a later "
            "stage's input on an SP step arrives already sharded, which the SP pass does not take. "
            "Use pipeline_parallel_size=1 or compile=False")
