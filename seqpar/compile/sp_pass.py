"""The sequence-parallel graph pass: a tensor-parallel FX graph in, a sequence-parallel one out.

It runs on the graph Dynamo captures (torch-level ops, before Inductor), inside the backend in
backend.py, so Inductor traces and lowers the rewritten graph like any other: no metadata of the
new nodes has to be kept by hand.

Terms. The token dim is dim 0 of the [T, ...] activations (flat tokens, no batch dim). A node is
*token-wise* when row i of its output depends only on row i of its token-dim inputs: an op of a
module whose class declares a token-wise SP role (layers/sp.py, read from the node's module stack,
whatever the op), or, where no declared role decides, an elementwise op, a cast, a reduction or
chunk over the last dim, a seqpar fence (the tables below). An op of a module that declares it
mixes tokens (attention) is never token-wise. A *source* is an
all_reduce sum, after which every rank holds the same [T, ...] sum: `seqpar::all_reduce(x, handle)`
(what Comm emits: the TP group's own transport, shared memory on one host; distributed/ops.py) or
torch's `wait_tensor(all_reduce(x, "sum", group))` (a TP model that knows nothing of seqpar). The
rewritten collectives are of the same kind as the source (`_Group`). A *component* is
a maximal set of token-wise nodes joined by data edges; the residual stream joins the regions of
all layers into one component, so they are rewritten together or not at all.

Algorithm:
0. Make the residual stream's in-place ops out of place (`_functionalize`): the model's decoder
   layer adds into the residual and writes the norm over its input (`residual += x`,
   `out.copy_(norm)`), which Dynamo records as mutations whose later readers name the old node.
   Each becomes its out-of-place op, and every later reader of the mutated tensor reads the new
   node instead, so data edges tell the whole story. Only mutations of a tensor that is no view
   and has no view read after the mutation are rewritten; others stay as they are.
1. Find the sources (`_is_source`). No source: nothing to do.
2. Grow components with a union-find over token-wise nodes (`_is_token_wise`): a token-wise node
   joins every token-wise producer and consumer it is connected to through a token-dim tensor.
   Each source seeds the component of its token-wise consumers.
3. Classify every edge leaving a component:
   - into a matmul as its token operand (`_is_matmul_input`), directly or through the
     `tokenwise_end` fence, or into any op of a module whose role gathers its input (a
     column-parallel layer, whatever its matmul is): an *exit*, all-gathered;
   - into the graph output: an exit, all-gathered, or left sharded when `shard_outputs` (the
     seqpar runner then samples from the shards as eager SP does);
   - anything else (attention, a cumsum over tokens, a size query, a row index): the component
     *mixes tokens*: it stays TP and is reported with that node.
   Edges entering a component come from sources (rewritten to reduce_scatter) or from other
   nodes (a replicated or row-local tensor: each rank keeps its own rows with a slice).
4. Rewrite each component that only has exits (and the same TP group and token count T at every
   source): T_pad = ceil(T / N) * N; each source becomes reduce_scatter(pad(x, T_pad)) ->
   [T_pad / N, ...] (seqpar::reduce_scatter_tokens pads itself); each other entry pad(x, T_pad)[r * T_pad / N : (r + 1) * T_pad / N]; the
   component's nodes then run on the shard unchanged; each exit gets all_gather -> [T_pad, ...]
   -> [:T]. When T is a multiple of N by construction (the runner feeds T = N * s), the pads and
   slices are no-ops that Inductor drops.
5. Optionally (overlap=True), where the matmul is a plain linear: linear -> reduce_scatter
   becomes `seqpar::matmul_reduce_scatter` and all_gather -> linear `seqpar::all_gather_matmul`,
   the ring collective matmuls of layers/overlap.py.
6. Remove every fence (identity), `graph.lint()`, recompile. The report lists what was rewritten
   and what was left alone and why.

Deliberately conservative: an op neither a declared role nor the predicates know is not
token-wise, so it ends the component; if it reads a component tensor, the whole component stays
TP (reported). Only flat [T, features] activations (dim 0 = tokens) are sharded.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

import seqpar.compile.ops  # noqa: F401 (registers the ring collective matmuls this pass inserts)
from seqpar.distributed.ops import FENCES, comm_of
from seqpar.layers import sp

_C10D = torch.ops._c10d_functional
_SEQPAR = torch.ops.seqpar
_BEGIN = torch.ops.seqpar.tokenwise_begin.default
_END = torch.ops.seqpar.tokenwise_end.default

# Elementwise ops as Dynamo records them: functions, and tensor methods by name.
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.exp, torch.tanh, torch.sigmoid, torch.abs, torch.square, torch.clamp,
    F.silu, F.gelu, F.relu, torch.relu, torch.nn.functional.sigmoid, _BEGIN, _END,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "abs",
    "square", "clamp", "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone",
}
_LAST_DIM_REDUCTIONS = {"mean", "sum", "amax", "amin", "norm", "var"}
_LAST_DIM_SPLITS = {"chunk", "split"}
_LAST_DIM_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.norm}
_LAST_DIM_SPLIT_FUNCTIONS = {torch.chunk, torch.split}
_MATMULS = {torch._C._nn.linear, F.linear, torch.matmul, torch.mm, operator.matmul}


@dataclass
class Region:
    """One component: what the pass found and what it did."""
    sources: list[str]
    exits: list[str]
    entries: list[str] = field(default_factory=list)
    collective_matmuls: int = 0
    """all_gather / reduce_scatter fused with their matmul (overlap=True)."""
    sharded_outputs: int = 0
    """Graph outputs left as [T_pad / N, ...] shards (shard_outputs=True)."""
    rewritten: bool = False
    reason: str = ""

    def describe(self) -> str:
        what = (f"{len(self.sources)} all_reduce -> reduce_scatter, {len(self.exits)} all_gather"
                + (f" before {', '.join(self.exits[:4])}{' ...' if len(self.exits) > 4 else ''}"
                   if self.exits else "")
                + (f", {self.sharded_outputs} output(s) left sharded" if self.sharded_outputs
                   else "")
                + (f", {self.collective_matmuls} as collective matmuls" if self.collective_matmuls
                   else ""))
        if self.rewritten:
            return "rewritten to SP: " + what
        return (f"left TP ({self.reason}): {len(self.sources)} all_reduce from "
                f"{', '.join(self.sources[:4])}")


@dataclass
class PassReport:
    regions: list[Region] = field(default_factory=list)
    fences_removed: int = 0
    functionalized: int = 0
    """In-place ops made out of place (step 0)."""

    @property
    def rewritten(self) -> list[Region]:
        return [r for r in self.regions if r.rewritten]

    @property
    def left_alone(self) -> list[Region]:
        return [r for r in self.regions if not r.rewritten]

    def summary(self) -> str:
        lines = [f"seqpar sp pass: {len(self.rewritten)} region(s) rewritten, "
                 f"{len(self.left_alone)} left TP"]
        lines += [f"  region {i}: {r.describe()}" for i, r in enumerate(self.regions)]
        return "\n".join(lines)


# ---- predicates ------------------------------------------------------------------------------

def _val(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for a node's output, if it is one tensor."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _has_token_dim(node, tokens) -> bool:
    """A tensor of 2+ dims whose dim 0 is the token count (1-D ones broadcast on the last dim)."""
    v = _val(node)
    return v is not None and v.dim() >= 2 and tokens is not None and _same(v.shape[0], tokens)


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.SymInt) else str(a) == str(b)
    except Exception:  # noqa: BLE001 - an undecidable symbolic comparison is "not the same"
        return False


def _is_all_reduce(node: fx.Node) -> bool:
    return (node.op == "call_function"
            and node.target in (_C10D.all_reduce.default, _C10D.all_reduce)
            and len(node.args) >= 2 and node.args[1] in ("sum", "SUM"))


def _is_wait(node: fx.Node) -> bool:
    return (node.op == "call_function"
            and node.target in (_C10D.wait_tensor.default, _C10D.wait_tensor))


def _is_seqpar_all_reduce(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_SEQPAR.all_reduce.default,
                                                          _SEQPAR.all_reduce)


def _is_source(node: fx.Node) -> bool:
    """The point where every rank holds the same sum: seqpar::all_reduce(x, handle) (Comm's, on
    the group's own transport), or torch's wait_tensor(all_reduce(x, "sum", group))."""
    return _is_seqpar_all_reduce(node) or (
        _is_wait(node) and isinstance(node.args[0], fx.Node) and _is_all_reduce(node.args[0]))


class _Group:
    """The TP group of a source and how to emit its collectives: a seqpar Comm (by handle) or a
    torch process group (by name, functional collectives)."""

    def __init__(self, src: fx.Node):
        if _is_seqpar_all_reduce(src):
            self.handle, self.name = src.args[1], None
            comm = comm_of(self.handle)
            self.size, self.rank = comm.world_size, comm.rank
        else:
            self.handle, self.name = None, src.args[0].args[2]
            pg = torch._C._distributed_c10d._resolve_process_group(self.name)
            self.size, self.rank = pg.size(), pg.rank()

    @staticmethod
    def key(src: fx.Node):
        return ("comm", src.args[1]) if _is_seqpar_all_reduce(src) else ("pg", src.args[0].args[2])

    @staticmethod
    def reduced(src: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
        """(the all_reduce's input [T, ...], the source's nodes, last first)."""
        if _is_seqpar_all_reduce(src):
            return src.args[0], [src]
        return src.args[0].args[0], [src, src.args[0]]

    def reduce_scatter(self, graph: fx.Graph, x: fx.Node, t_pad, padded) -> fx.Node:
        """[T, ...] -> [T_pad / N, ...] this rank's rows of the sum (rows past T zero)."""
        if self.handle is not None:  # the op pads itself
            return graph.call_function(_SEQPAR.reduce_scatter_tokens.default,
                                       (x, t_pad, self.handle))
        scattered = graph.call_function(_C10D.reduce_scatter_tensor.default,
                                        (padded(x), "sum", self.size, self.name))
        return graph.call_function(_C10D.wait_tensor.default, (scattered,))

    def all_gather(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        """[S, ...] -> [N * S, ...] in rank order."""
        if self.handle is not None:
            return graph.call_function(_SEQPAR.all_gather_tokens.default, (x, self.handle))
        g = graph.call_function(_C10D.all_gather_into_tensor.default, (x, self.size, self.name))
        return graph.call_function(_C10D.wait_tensor.default, (g,))

    def ring_handle(self) -> str:
        """The Comm the collective matmuls run on: the source's own, or for a torch process group
        one over its backend, built once per group at compile time."""
        if self.handle is not None:
            return self.handle
        if self.name not in _RING_COMMS:
            from seqpar.distributed.comm import Comm

            pg = torch._C._distributed_c10d._resolve_process_group(self.name)
            _RING_COMMS[self.name] = Comm(pg, self.rank, self.size, shm=False)
        return _RING_COMMS[self.name].handle


_RING_COMMS: dict = {}
"""process group name -> the Comm its collective matmuls use (kept alive for its handle)."""


def _is_fence(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in FENCES


def _dim_arg(node: fx.Node, pos: int):
    return node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else None)


def _is_last_dim(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        return len(dim) == 1 and _is_last_dim(dim[0], ndim)
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _role(node: fx.Node) -> sp.Role | None:
    """The SP role declared by the innermost module whose call recorded `node` (Dynamo's
    nn_module_stack: calls of the module itself, not of its other methods), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack or node.op not in ("call_function", "call_method"):
        return None
    kind = list(stack.values())[-1][1]
    return sp.role_of(kind) if isinstance(kind, type) else None


def _is_token_wise(node: fx.Node) -> bool:
    """Row i of the output depends only on row i of the token-dim inputs."""
    role = _role(node)
    if role is not None and role.token_wise is not None:
        return role.token_wise
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return True
        first = _val(node.args[0]) if node.args else None
        if node.target in _LAST_DIM_REDUCTION_FUNCTIONS:
            return first is not None and _is_last_dim(_dim_arg(node, 1), first.dim())
        if node.target in _LAST_DIM_SPLIT_FUNCTIONS:
            return first is not None and _is_last_dim(_dim_arg(node, 2), first.dim())
        if node.target is operator.getitem:
            src, idx = node.args
            if isinstance(src, fx.Node) and _is_token_wise(src) and _is_split(src):
                return isinstance(idx, int)  # one piece of a last-dim chunk / split
            # x[:, a:b] or x[..., a:b]: the first index keeps every row
            return (isinstance(idx, tuple) and len(idx) > 1 and idx[0] == slice(None, None, None))
        return False
    if node.op != "call_method":
        return False
    name, first = node.target, _val(node.args[0]) if node.args else None
    if name in _ELEMENTWISE_METHODS:
        if name == "to":  # a cast; not a device move of a different shape
            return all(not isinstance(a, (str, torch.device)) for a in node.args[1:])
        return True
    if name in _LAST_DIM_REDUCTIONS:
        return first is not None and _is_last_dim(_dim_arg(node, 1), first.dim())
    if name in _LAST_DIM_SPLITS:
        return first is not None and _is_last_dim(_dim_arg(node, 2), first.dim())
    return False


def _is_matmul_input(node: fx.Node, user: fx.Node) -> bool:
    """`node` is the token operand (rows) of matmul `user`: rows of the output follow its rows."""
    if user.op == "call_function" and user.target in _MATMULS:
        return len(user.args) >= 1 and user.args[0] is node and node not in user.args[1:]
    if user.op == "call_method" and user.target == "matmul":
        return user.args[0] is node
    return False


def _is_exit(node: fx.Node, user: fx.Node) -> bool:
    """An edge out of a component that an all_gather can close: a matmul, an op of a module whose
    role gathers its input (a column-parallel layer), the end fence whose every user is a matmul
    (the column-parallel input), or the graph output."""
    if user.op == "output":
        return True
    if _is_matmul_input(node, user):
        return True
    role = _role(user)
    if role is not None and role.gathers_input:
        return True
    return (user.op == "call_function" and user.target is _END and len(user.users) > 0
            and all(_is_matmul_input(user, u) for u in user.users))


# In-place op -> its out-of-place twin (None: copy_, whose value is its source).
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "copy_": None}
# Ops whose output may share storage with their first input.
_VIEW_METHODS = {"view", "reshape", "narrow", "transpose", "t", "permute", "unsqueeze", "squeeze",
                 "expand", "expand_as", "flatten", "unflatten", "chunk", "split", "contiguous",
                 "float", "half", "bfloat16", "to", "type_as", "detach", "view_as", "select"}
_VIEW_FUNCTIONS = {operator.getitem, torch.chunk, torch.split, torch.narrow, torch.transpose,
                   torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten}


def _inplace(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes (its first argument), else None."""
    if node.op == "call_function" and (node.target in _INPLACE_FUNCTIONS
                                       or node.kwargs.get("inplace") is True):
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return node.args[0]
    return None


def _is_view(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS))


def _aliases(node: fx.Node) -> set[fx.Node]:
    """Nodes that may share node's storage through views of it (node excluded)."""
    out, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if _is_view(user) and user not in out:
                out.add(user)
                todo.append(user)
    return out


def _private_piece(node: fx.Node) -> bool:
    """node is one piece of a chunk / split whose base nothing else reads (the MLP's gate of
    gate_up): a write to it reaches no other reader, since the pieces do not overlap."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    split = node.args[0]
    if not (isinstance(split, fx.Node) and _is_split(split)
            and all(u.op == "call_function" and u.target is operator.getitem
                    for u in split.users)):
        return False
    base = split.args[0]
    return (isinstance(base, fx.Node) and base.op != "placeholder" and not _is_view(base)
            and list(base.users) == [split])


def _is_split(node: fx.Node) -> bool:
    """A chunk / split (its getitems are disjoint pieces of its input)."""
    return ((node.op == "call_method" and node.target in _LAST_DIM_SPLITS)
            or (node.op == "call_function" and node.target in _LAST_DIM_SPLIT_FUNCTIONS))


def _functionalize(graph: fx.Graph) -> int:
    """Step 0: in-place ops on fresh tensors become out of place; returns how many."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    latest: dict = {}  # a mutated tensor -> the node now holding its value
    done = 0
    for node in list(graph.nodes):
        for arg in node.all_input_nodes:
            if arg in latest:
                new = arg
                while new in latest:
                    new = latest[new]
                node.replace_input_with(arg, new)
        target = _inplace(node)
        if target is None or target.op == "placeholder" or (_is_view(target)
                                                            and not _private_piece(target)):
            continue
        if any(order.get(u, -1) > order[node] for a in _aliases(target) for u in a.users):
            continue  # a view read after the write would miss it
        if node.op == "call_method" and node.target == "copy_":
            src, dst = _val(node.args[1]), _val(target)
            if src is None or dst is None or src.shape != dst.shape or src.dtype != dst.dtype:
                continue  # a broadcasting or casting copy: keep it
            new = node.args[1]
        else:
            with graph.inserting_before(node):
                if node.op == "call_method":
                    new = graph.call_method(_INPLACE_METHODS.get(node.target, node.target[:-1]),
                                            node.args, node.kwargs)
                elif node.target in _INPLACE_FUNCTIONS:
                    new = graph.call_function(_INPLACE_FUNCTIONS[node.target], node.args,
                                              node.kwargs)
                else:
                    new = graph.call_function(node.target, node.args,
                                              {**node.kwargs, "inplace": False})
            new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        latest[target] = new
        order[new] = order[node]
        done += 1
    return done


# ---- the pass ----------------------------------------------------------------------------------

class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def sequence_parallel_pass(gm: fx.GraphModule, shard_outputs: bool = False,
                           rewrite: bool = True, overlap: bool = False) -> PassReport:
    """Rewrite gm in place (see the module docstring); return what was done.

    rewrite=False only analyses (and removes the fences): the compiled TP path.
    overlap=True: where the matmul is a plain linear, all_gather -> linear becomes
    `seqpar::all_gather_matmul` and linear -> reduce_scatter `seqpar::matmul_reduce_scatter`
    (the collective matmuls of layers/overlap.py).
    """
    graph = gm.graph
    report = PassReport()
    report.functionalized = _functionalize(graph)
    nodes = list(graph.nodes)

    # 1. sources
    sources = [n for n in nodes if _is_source(n)]
    order = {n: i for i, n in enumerate(nodes)}

    # 2. components of token-wise nodes; a source belongs to the component of its consumers
    uf = _UnionFind()
    token_wise = {n for n in nodes if _is_token_wise(n)}
    for n in token_wise:
        uf.find(n)
        for arg in n.all_input_nodes:
            if arg in token_wise:
                uf.union(n, arg)
    members: dict = {}
    for n in token_wise:
        members.setdefault(uf.find(n), []).append(n)
    seeds: dict = {}
    for src in sources:
        roots = {uf.find(u) for u in src.users if u in token_wise}
        if not roots:
            # all_reduce straight into a matmul or output: a region of zero ops; still a candidate
            roots = {("lone", src)}
            members[("lone", src)] = []
        for root in list(roots)[1:]:  # a source feeding two components joins them
            members[list(roots)[0]] += members.pop(root, [])
            uf.union(root, list(roots)[0])
            seeds.setdefault(list(roots)[0], []).extend(seeds.pop(root, []))
        seeds.setdefault(list(roots)[0], []).append(src)

    # 3. classify and 4. rewrite, component by component
    for root, srcs in seeds.items():
        comp = set(members[root]) | set(srcs)
        tokens = _val(srcs[0]).shape[0] if _val(srcs[0]) is not None else None
        groups = {_Group.key(s) for s in srcs}
        region = Region(sources=[_origin(s) for s in srcs], exits=[])
        report.regions.append(region)
        exits, entries, mixing = [], [], None
        for n in sorted(comp, key=order.__getitem__):
            for user in n.users:
                if user in comp:
                    continue
                if _is_exit(n, user):
                    exits.append((n, user))
                elif mixing is None:
                    mixing = f"{_describe(user)} reads tokens across rows"
            if n in srcs:
                continue
            for arg in n.all_input_nodes:
                if arg not in comp and _has_token_dim(arg, tokens):
                    entries.append((arg, n))
        region.exits = [_describe(u) for _, u in exits if not (shard_outputs and u.op == "output")]
        region.sharded_outputs = sum(1 for _, u in exits if shard_outputs and u.op == "output")
        region.entries = [_describe(a) for a, _ in entries]
        if mixing is None and len(groups) != 1:
            mixing = f"all_reduces over {len(groups)} different groups"
        if mixing is None and any(not _same(_val(s).shape[0], tokens)
                                  for s in srcs if _val(s) is not None):
            mixing = "all_reduces of different token counts"
        if mixing is None and tokens is None:
            mixing = "no shape recorded for the all_reduce"
        if mixing is None and any(_val(s) is None or _val(s).dim() != 2 for s in srcs):
            # [B, S, H] layouts: dim 0 is not the tokens; the pass shards flat [T, H] only
            mixing = "an all_reduce of a tensor that is not flat [tokens, features]"
        if mixing is None and not rewrite:
            mixing = "SP off"
        if mixing is not None:
            region.reason = mixing
            continue
        region.collective_matmuls = _rewrite(graph, srcs, entries, exits, _Group(srcs[0]),
                                             shard_outputs, overlap)
        region.rewritten = True

    # 6. fences are identities
    for n in list(graph.nodes):
        if _is_fence(n):
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
            report.fences_removed += 1
    graph.eliminate_dead_code(lambda n: n.is_impure() or _inplace(n) is not None)
    graph.lint()
    gm.recompile()
    return report


def _linear_parts(mm: fx.Node):
    """(weight, bias) of a plain linear call, else None."""
    if mm.op != "call_function" or mm.target not in (torch._C._nn.linear, F.linear):
        return None
    weight = mm.args[1] if len(mm.args) > 1 else mm.kwargs.get("weight")
    bias = mm.args[2] if len(mm.args) > 2 else mm.kwargs.get("bias")
    return None if weight is None else (weight, bias)


def _rewrite(graph: fx.Graph, srcs, entries, exits, group: _Group, shard_outputs: bool,
             overlap: bool = False) -> int:
    """Step 4 on one component; returns the number of collective matmuls used."""
    fused = 0
    n, rank = group.size, group.rank
    first = _Group.reduced(srcs[0])[0]  # the first all_reduce's input, [T, ...]
    if _linear_parts(first) is not None:
        first = first.args[0]  # the linear's input has its rows (and outlives an overlap fusion)

    with graph.inserting_before(_Group.reduced(srcs[0])[1][-1]):
        # T, T_pad = ceil(T / N) * N and the shard S = T_pad / N as graph values (symbolic when
        # T is dynamic; plain ints when T is static).
        t = graph.call_method("size", (first, 0))
        rounded = graph.call_function(operator.add, (t, n - 1))
        shard = graph.call_function(operator.floordiv, (rounded, n))
        t_pad = graph.call_function(operator.mul, (shard, n))
        pad = graph.call_function(operator.sub, (t_pad, t))

    def padded(x):
        v = _val(x)
        widths = (0, 0) * (v.dim() - 1) + (0,)
        return graph.call_function(F.pad, (x, (*widths, pad)))

    for src in srcs:
        x, dead = _Group.reduced(src)
        parts = _linear_parts(x) if overlap and len(x.users) == 1 else None
        if parts is not None and parts[1] is None:  # linear -> reduce_scatter, one ring
            with graph.inserting_before(dead[-1]):
                ring = graph.call_function(torch.ops.seqpar.matmul_reduce_scatter.default,
                                           (x.args[0], parts[0], t_pad, group.ring_handle()))
            src.replace_all_uses_with(ring)
            for node in (*dead, x):
                graph.erase_node(node)
            fused += 1
            continue
        with graph.inserting_before(dead[-1]):
            scattered = group.reduce_scatter(graph, x, t_pad, padded)
        src.replace_all_uses_with(scattered)
        for node in dead:
            graph.erase_node(node)

    local: dict = {}
    for arg, user in entries:
        if arg not in local:
            with graph.inserting_before(_latest(graph, arg, pad).next):
                start = graph.call_function(operator.mul, (shard, rank))
                local[arg] = graph.call_method("narrow", (padded(arg), 0, start, shard))
        user.replace_input_with(arg, local[arg])

    gathered: dict = {}
    for node, user in exits:
        if user.op == "output" and shard_outputs:
            continue
        matmuls = ([user] if _is_matmul_input(node, user) else
                   list(user.users) if user.op == "call_function" and user.target is _END else [])
        if overlap and matmuls and all(_linear_parts(mm) for mm in matmuls):
            for mm in matmuls:  # all_gather -> linear, one ring each
                weight, bias = _linear_parts(mm)
                with graph.inserting_before(mm):
                    ring = graph.call_function(torch.ops.seqpar.all_gather_matmul.default,
                                               (node, weight, bias, group.ring_handle()))
                    rows = graph.call_function(operator.getitem, (ring, slice(None, t)))
                mm.replace_all_uses_with(rows)
                graph.erase_node(mm)
                fused += 1
            if user is not matmuls[0]:
                graph.erase_node(user)  # the end fence, now unused
            continue
        if node not in gathered:
            with graph.inserting_before(_latest(graph, node, pad).next):
                whole = group.all_gather(graph, node)
                gathered[node] = graph.call_function(operator.getitem, (whole, slice(None, t)))
        user.replace_input_with(node, gathered[node])
    return fused


def _latest(graph: fx.Graph, a: fx.Node, b: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return a if order[a] > order[b] else b


def _origin(node: fx.Node) -> str:
    """Where a node came from in the user's code (module path when Dynamo recorded one)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L__self___", "")
        return path.removeprefix("model.model.").removeprefix("model.")  # the runner's own prefix
    return node.name


def _describe(node: fx.Node) -> str:
    target = (node.target if node.op == "call_method"
              else getattr(node.target, "__name__", str(node.target)))
    return f"{target} ({_origin(node)})" if node.op != "output" else "graph output"
