"""The TP group's collectives as torch custom ops, so compiled graphs run them on the group's own
transport (shared memory on one host, see transport.py) instead of torch's functional collectives,
and the two fences around the token-wise regions the SP graph pass reads.

A graph cannot hold a Comm, so every Comm registers itself here and gets a `handle`, a short
string ("tp0", Comm.handle); the ops find their Comm by it. A string, not an int: Dynamo turns ints
into symbols under dynamic shapes, a string always stays a constant of the graph. The ops are functional (they return new tensors and
leave their inputs alone) and have fake kernels, so Dynamo, AOTAutograd and Inductor trace them
with symbolic token counts:

    torch.ops.seqpar.all_reduce(x, handle)                     [T, H] -> [T, H], the sum over ranks
    torch.ops.seqpar.reduce_scatter_tokens(x, padded, handle)  [T, H] (T <= padded) -> [padded / N, H]
    torch.ops.seqpar.all_gather_tokens(x, handle)              [S, H] -> [N * S, H], rank order

They are Comm's verbs of the same names (padding, bypass and all); while torch.compile traces,
Comm.all_reduce / reduce_scatter_tokens / all_gather_tokens emit these ops themselves. A graph pass
that inserts one writes `graph.call_function(torch.ops.seqpar.reduce_scatter_tokens.default,
(x, padded, handle))`, the handle taken from the op it replaces. Each op counts its bytes in the
Comm's stats when it runs, as the eager verb does: do not count it again from the graph.

Fences mark where a token-wise region of the residual stream starts and ends, so the SP pass
(compile/sp_pass.py) does not have to guess from norm variants:

    torch.ops.seqpar.tokenwise_begin(x)  after a reduction over the TP group (row-parallel output,
                                         embedding)
    torch.ops.seqpar.tokenwise_end(x)    at an input that needs every token (a column-parallel
                                         matmul's)

Both return their input's values. Comm emits them (comm.py) only while torch.compile traces, so
eager steps pay nothing; the pass removes them from the graph before Inductor sees it.

Handles number the live Comms from 0, the smallest number free, so a process's first group is
"tp0" in every run and a
graph cached on disk (Inductor's FX graph cache) matches on the next start.
"""
from __future__ import annotations

import weakref

import torch
from torch.library import custom_op

from seqpar.distributed.collectives import Collective

_COMMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
"""handle -> the live Comm it names."""


def register(comm) -> str:
    """A handle for `comm`, valid while comm lives."""
    handle = next(h for h in (f"tp{i}" for i in range(len(_COMMS) + 1)) if h not in _COMMS)
    _COMMS[handle] = comm
    return handle


def comm_of(handle: str):
    """The Comm behind `handle`; KeyError naming it when that Comm is gone."""
    try:
        return _COMMS[handle]
    except KeyError:
        raise KeyError(f"no live Comm has handle {handle!r} (live: {sorted(_COMMS)})") from None


def _fresh(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A custom op may not return its input: copy where a verb's bypass handed x back."""
    return out.clone() if out is x else out


@custom_op("seqpar::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, handle: str) -> torch.Tensor:
    return comm_of(handle).all_reduce(x, out=torch.empty_like(x))


@all_reduce.register_fake
def _(x, handle):
    return torch.empty_like(x)


@custom_op("seqpar::reduce_scatter_tokens", mutates_args=())
def reduce_scatter_tokens(x: torch.Tensor, padded: int, handle: str) -> torch.Tensor:
    return _fresh(comm_of(handle).reduce_scatter_tokens(x, padded), x)


@reduce_scatter_tokens.register_fake
def _(x, padded, handle):
    return x.new_empty(padded // comm_of(handle).world_size, *x.shape[1:])


@custom_op("seqpar::all_gather_tokens", mutates_args=())
def all_gather_tokens(x: torch.Tensor, handle: str) -> torch.Tensor:
    return _fresh(comm_of(handle).all_gather_tokens(x), x)


@all_gather_tokens.register_fake
def _(x, handle):
    return x.new_empty(comm_of(handle).world_size * x.shape[0], *x.shape[1:])


@custom_op("seqpar::tokenwise_begin", mutates_args=())
def tokenwise_begin(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # custom ops may not return an input alias; only reached without the pass


@tokenwise_begin.register_fake
def _(x):
    return torch.empty_like(x)


@custom_op("seqpar::tokenwise_end", mutates_args=())
def tokenwise_end(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@tokenwise_end.register_fake
def _(x):
    return torch.empty_like(x)


FENCES = (torch.ops.seqpar.tokenwise_begin.default, torch.ops.seqpar.tokenwise_end.default)

COLLECTIVES = {torch.ops.seqpar.all_reduce.default: Collective.ALL_REDUCE,
               torch.ops.seqpar.reduce_scatter_tokens.default: Collective.REDUCE_SCATTER,
               torch.ops.seqpar.all_gather_tokens.default: Collective.ALL_GATHER}
"""Each op's overload (the target of its graph node) -> the Comm stats entry it counts in."""
