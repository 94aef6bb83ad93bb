"""Peak activation memory of a step on this rank: the most bytes that the step's own allocations
hold at once. Weights and the KV cache allocated before the step are not counted.

CUDA has allocator statistics. On CPU PyTorch keeps none, so the probe reads the C allocator's
own count of bytes in use (glibc `mallinfo2`: every arena plus mmapped blocks, so frees made on
gloo's threads count too) after every aten op of this thread, through a dispatch mode. The peak
is at the granularity of ops: memory an op allocates and frees inside itself is not seen.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _libc_in_use():
    """A function returning the bytes malloc has handed out and not got back, or None off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mmapped blocks

    return in_use


class _AfterEachOp(TorchDispatchMode):
    def __init__(self, probe: "PeakMemory"):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.probe._sample()
        return out


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0
        if self.device.type == "cpu":
            self._in_use = _libc_in_use()
            if self._in_use is None:
                raise RuntimeError("the CPU memory probe needs glibc >= 2.33 (mallinfo2)")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._in_use()
            self._mode = _AfterEachOp(self)
            self._mode.__enter__()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, self._in_use() - self._base)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self._sample()
        return False
