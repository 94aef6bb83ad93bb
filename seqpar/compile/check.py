"""`seqpar check --compile`: run the SP pass on the model's graph without starting any rank.

The forward is traced by Dynamo on the meta device (no weights, no data), over a fake
process group of tp ranks in this process (torch's "fake" backend: collectives are recorded,
never run); the backend runs the pass, keeps its report and stops before Inductor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.compile.sp_pass import PassReport


class _Stop(Exception):
    pass


def pass_report(cfg, tp: int, dtype: torch.dtype, max_len: int, sp: bool = True) -> PassReport:
    """The SP pass's report on `cfg`'s compiled forward at tensor_parallel_size=tp."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seqpar.compile.runner import CompiledForward
    from seqpar.distributed.comm import Comm
    from seqpar.models import MODELS

    if dist.is_initialized():
        raise RuntimeError("a process group is already running in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        with torch.device("meta"):
            model = MODELS[cfg.model_type](cfg, Comm(dist.group.WORLD, 0, tp), dtype, max_len)
        reports: list[PassReport] = []

        def backend(gm, example_inputs):
            from seqpar.compile.sp_pass import sequence_parallel_pass

            reports.append(sequence_parallel_pass(gm, shard_outputs=True, rewrite=sp))
            raise _Stop

        runner = CompiledForward(model, sp=sp)
        compiled = torch.compile(runner._graph, backend=backend, fullgraph=True)
        ids = torch.zeros(tp, 4, dtype=torch.int64, device="meta")
        positions = torch.zeros_like(ids)
        for x in (ids, positions):
            torch._dynamo.maybe_mark_dynamic(x, 1)
        try:
            with torch.inference_mode():
                compiled(ids, positions)
        except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's exception
            if not reports:
                raise RuntimeError(f"tracing the forward failed: {e}") from e
        finally:
            torch._dynamo.reset()
        return reports[0]
    finally:
        dist.destroy_process_group()
