"""Peak activation memory of a step on this rank: the most bytes that the step's own allocations
hold at once. Weights and the KV cache allocated before the step are not counted.

CUDA has allocator statistics. On CPU there are none, so the allocations and frees are read from
the PyTorch profiler's memory events and summed in time order.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        self._prof.__exit__(*exc)
        # Each event's self memory: allocations (+) and frees (-) made directly in it; frees
        # outside any op come as "[memory]" events. In start order, the running sum's maximum is
        # the peak (at the granularity of ops).
        deltas = sorted((e.time_range.start, e.self_cpu_memory_usage)
                        for e in self._prof.events() if e.self_cpu_memory_usage)
        live = 0
        for _, nbytes in deltas:
            live += nbytes
            self.peak = max(self.peak, live)
        return False
