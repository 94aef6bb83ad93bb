"""Quantized storage for a linear layer's local shard, and its matmul.

A linear layer holds this rank's shard of W [out, in] either dense (an nn.Parameter in the compute
dtype, F.linear) or in one of these formats, each with the kernel that multiplies it:

- GGUFBlocks: a GGUF file's Q4_1 / Q8_0 blocks as the file holds them, multiplied by seqpar's own
  `gguf_mm` (seqpar/csrc/gguf_matmul.cpp) with llama.cpp's arithmetic: each activation row is
  rounded to 8-bit blocks of 32 (llama.cpp's Q8_1 / Q8_0), then exact integer dot products. The
  default model's weights (Q4_1 layers, a Q8_0 embedding) run this way, activations float32.
- PackedInt4: torch's int4 weight-only kernel (`_convert_weight_to_int4pack_for_cpu`,
  `_weight_int4pack_mm_for_cpu`): 4-bit q with w = (q - 8) * scale + zero per group of GROUP
  input features. The other GGUF types map onto it exactly (Q4_0: scale d, zero 0; Q4_K: per
  sub-block), and so does quantization="int4". Weights of 5 to 8 bits (Q5_K, Q6_K, ...) are split
  into two 4-bit planes, q - 2^(bits-1) = lo + 16 hi, laid side by side along the input:
  y = [x, x] @ [W_lo, W_hi]^T is one kernel call on twice the input features, the same values.
  Activations stay in the compute dtype.
- Int8PerChannel: int8 with one scale per output feature (quantization="int8"), multiplied by
  seqpar's own `int8_mm` (seqpar/csrc/int8_matmul.cpp): weights widened to float32, activations
  as they are.

Measured on the AVX-512 (avx512_bf16, no AMX) host with torch 2.13, 2 threads, SmolLM2's shapes:
torch's packed kernels are vectorized for bfloat16 activations only (float32 runs 30-100x slower
than dense float32), so config.py's auto keeps PackedInt4 to bfloat16. They beat dense bf16
F.linear 2-10x at 1-4 rows, tie at about 16 and lose 2-4x at 256-2048 rows; no dense copy is kept
(it would undo the memory saving), so every row count runs the same kernel. seqpar's own kernels
(AMX host, one thread, SmolLM2's 30 layers at one row, CPU time): gguf_mm 11.3 ms against 14.8
for the same weights in PackedInt4; int8_mm 14.3 ms against torch._weight_int8pack_mm's 19.7 and
dense float32's 34.3; at 128 rows int8_mm 290 ms, torch's 390, dense float32 246.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from seqpar.config import QUANT_GROUP as GROUP
from seqpar.layers import attention_kernels, sp
from seqpar.loader.ggml_blocks import RAW_TYPES, Affine, Blocks

_N_ALIGN = 16  # torch's int4 packing needs the output features in multiples of 16
RAW_FORMATS = frozenset(t.lower() for t in RAW_TYPES)
"""Storage formats of GGUFBlocks: "q4_1", "q8_0"."""


def requantize(w: torch.Tensor, bits: int, group: int = GROUP) -> Affine:
    """Asymmetric min-max quantization of w [N, K] to `bits` bits per group of `group` input
    features: scale = (max - min) / (2^bits - 1), q = round((w - min) / scale). Each value moves
    by at most scale / 2."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 2 ** bits - 1)
    return Affine(q.reshape(n, k).to(torch.uint8).numpy(), scale.numpy(), lo.numpy(), bits, group)


def merge_rows(parts: list[tuple[int, Affine]]) -> Affine:
    """Row blocks of one weight -> one Affine, in row order: (first row, Affine) each, e.g. a
    fused layer's q, k and v shards. Parts of other bit widths share the widest (q < 2^bits
    either way, so the values stay exact); a 16-wide group (Q6_K) is requantized first."""
    parts = [(start, a if a.group == GROUP else requantize(torch.from_numpy(a.values()), 8))
             for start, a in sorted(parts, key=lambda p: p[0])]
    joined = [np.concatenate([getattr(a, f) for _, a in parts]) for f in ("q", "scale", "min")]
    return Affine(*joined, bits=max(a.bits for _, a in parts), group=GROUP)


class PackedInt4(nn.Module):
    """W [out, in] in torch's packed int4 layout; forward: [M, in] -> [M, out].

    planes 1: packed [out_pad, in / 2] uint8, scales_and_zeros [in / GROUP, out_pad, 2].
    planes 2: the same over 2 * in features (the low plane, then the high one)."""

    sp_role = sp.TOKEN_WISE  # a linear layer's weight: its local matmul, row by row

    def __init__(self, a: Affine, dtype: torch.dtype, device: torch.device):
        super().__init__()
        assert a.group == GROUP, a.group  # merge_rows requantizes other groups
        n, k = a.q.shape
        self.out_features, self.in_features = n, k
        self.planes = 1 if a.bits <= 4 else 2
        q = torch.from_numpy(a.q.astype(np.int32))
        scale, zero = torch.from_numpy(a.scale), torch.from_numpy(a.min)  # [N, K / GROUP]
        if self.planes == 1:  # w = scale q + min = (q - 8) scale + (min + 8 scale)
            scales, zeros = scale, zero + 8 * scale
        else:
            # Centred first, q - c = lo + 16 hi (c = 2^(bits-1), lo in 0..15, hi signed), so the
            # zeros stay small: they are rounded to the compute dtype, and an error there moves
            # a whole group of weights the same way. w = s lo + 16 s hi + (min + c s):
            # plane lo: (lo - 8) s + (min + c s + 8 s); plane hi: (hi + 8 - 8) 16 s + 0.
            centred = q - 2 ** (a.bits - 1)
            q = torch.cat([centred & 15, (centred >> 4) + 8], dim=1)  # [N, 2K]
            scales = torch.cat([scale, 16 * scale], dim=1)
            zeros = torch.cat([zero + (2 ** (a.bits - 1) + 8) * scale, torch.zeros_like(scale)],
                              dim=1)
        pad = -n % _N_ALIGN  # zero rows past `out`: their outputs are cut off in forward
        q = F.pad(q, (0, 0, 0, pad), value=8)
        sz = F.pad(torch.stack([scales, zeros], dim=-1), (0, 0, 0, 0, 0, pad))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1).to(device))
        self.register_buffer("scales_and_zeros",
                             sz.transpose(0, 1).contiguous().to(device, dtype))  # [G, N_pad, 2]

    @property
    def format(self) -> str:
        return "int4" if self.planes == 1 else "int4x2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the kernel reads x densely (a chunk of gate_up is strided)
        if self.planes == 2:
            x = torch.cat([x, x], dim=1)  # [M, 2K]: each plane sees the same activations
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]


class GGUFBlocks(nn.Module):
    """W [out, in] as a GGUF file holds it, blocks of one type (GGUF_TYPES) multiplied by gguf_mm:
    w uint8 [out, in / 32 * bytes per block], llama.cpp's block_q4_1 / block_q8_0 (the bytes of
    the file, no more). forward: [M, in] in any float dtype -> [M, out] in x's dtype, computed
    from float32 activations."""

    sp_role = sp.TOKEN_WISE  # a linear layer's weight: its local matmul, row by row

    def __init__(self, blocks: Blocks, device: torch.device):
        super().__init__()
        attention_kernels.load()  # registers torch.ops.seqpar_kernels (built by make install)
        self.type_name = blocks.type_name
        qtype = GGMLQuantizationType[self.type_name]
        self.type_id = qtype.value  # gguf_mm's type argument
        size, self.block_bytes = GGML_QUANT_SIZES[qtype]
        self.out_features = blocks.rows
        self.in_features = blocks.raw.shape[1] // self.block_bytes * size
        self.register_buffer("w", torch.from_numpy(np.ascontiguousarray(blocks.raw)).to(device))

    @property
    def format(self) -> str:
        return self.type_name.lower()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of W, dequantized -> [T, in] float32: the values the gguf library's
        dequantize gives (an embedding lookup: llama.cpp's get_rows)."""
        b = self.w[ids].view(len(ids), -1, self.block_bytes)  # [T, blocks, bytes]
        d = b[..., 0:2].contiguous().view(torch.float16).float()  # [T, blocks, 1]
        if self.type_name == "Q8_0":
            w = b[..., 2:].contiguous().view(torch.int8).float() * d
        else:  # Q4_1: d q + m, q the low then the high nibbles of 16 bytes
            qs = b[..., 4:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
            w = q * d + b[..., 2:4].contiguous().view(torch.float16).float()
        return w.view(len(ids), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op's overload itself: a decode step makes 121 of these calls, each a few us.
        return torch.ops.seqpar_kernels.gguf_mm.default(x, self.w, self.type_id)


class Int8PerChannel(nn.Module):
    """W [out, in] as int8 with one float32 scale per output feature (symmetric, max |w| / 127),
    multiplied by seqpar_kernels.int8_mm (seqpar/csrc/int8_matmul.cpp: weights widened to float32,
    activations as they are), or by torch._weight_int8pack_mm where seqpar's kernels could not be
    built."""

    sp_role = sp.TOKEN_WISE  # a linear layer's weight: its local matmul, row by row

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = w.shape
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [N]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scales", scale)
        self.own = attention_kernels.available()

    format = "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own:
            return torch.ops.seqpar_kernels.int8_mm.default(x, self.qweight, self.scales)
        return torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales.to(x.dtype))


KERNELS = {"dense": "F.linear", "int4": "torch._weight_int4pack_mm_for_cpu",
           "int4x2": "torch._weight_int4pack_mm_for_cpu on [x, x]",
           "int8": "seqpar_kernels.int8_mm", "q4_1": "seqpar_kernels.gguf_mm (Q4_1 x Q8_1)",
           "q8_0": "seqpar_kernels.gguf_mm (Q8_0 x Q8_0)"}
"""Storage format -> the kernel that multiplies it (every row count: see the module docstring)."""


def storage_format(mode: str, types: set[str]) -> str:
    """The format a linear layer's weight takes: mode is the resolved quantization, types the
    checkpoint types of its parts ("Q4_1", "Q6_K", "F32", ...). Mirrors finish_loading."""
    from seqpar.loader.ggml_blocks import KERNEL_TYPES, bits_of
    if mode == "gguf":
        if not types or not types <= KERNEL_TYPES:
            return "dense"  # a part without a kernel (or a float part): the layer runs dense
        # RAW_TYPES in their own blocks where seqpar's kernels are built, else in PackedInt4
        if len(types) == 1 and types <= RAW_TYPES and attention_kernels.available():
            return next(iter(types)).lower()
        return "int4" if max(bits_of(t) for t in types) <= 4 else "int4x2"
    return {"int8": "int8", "int4": "int4"}.get(mode, "dense")


def storage_bytes(fmt: str, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes one rank holds for a [out, in] weight shard in format `fmt` (what the live buffers
    take: tests check the two agree)."""
    size = dtype.itemsize
    if fmt in RAW_FORMATS:
        return out_features * GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]][1] * (
            in_features // 32)
    if fmt == "dense":
        return out_features * in_features * size
    if fmt == "int8":
        return out_features * in_features + out_features * 4  # float32 scales
    k = in_features * (2 if fmt == "int4x2" else 1)
    n = out_features + -out_features % _N_ALIGN
    return n * k // 2 + (k // GROUP) * n * 2 * size


def weight_rows(model: nn.Module, sources: dict[str, set[str]] | None = None,
                mode: str | None = None) -> list[dict]:
    """What each kind of weight of a model shard runs, one row per (name, type, format): the
    module name, how many there are, the checkpoint type(s), the storage format, the kernel and
    the bytes on this rank (a tensor shared by two modules, tied embeddings, counts once). From a
    loaded model (sources None), or predicted for a model built on the meta device from sources
    (module name -> checkpoint types) and the resolved quantization mode. A module that
    multiplies by a quantized weight says how through `storage` / `planned_storage(mode, types)`
    and `source_types` (the parallel linear layers, the LM head; an embedding that looks its rows
    up in GGUF blocks too, `looks_up`, whose blocks a tied LM head shares)."""
    rows: dict[tuple, dict] = {}
    seen: set[int] = set()
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if isinstance(module, (PackedInt4, Int8PerChannel, GGUFBlocks)):
            continue  # counted with the layer that holds it
        own = list(module.parameters(recurse=False))
        params = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        matmul = hasattr(module, "planned_storage")
        if not own and not matmul:
            continue
        dtype = f" ({str(own[0].dtype).replace('torch.', '')})" if own else ""
        if not matmul:
            fmt, types = ("dense" if params else "tied"), (sources or {}).get(name, set())
            kernel, nbytes = type(module).__name__ + dtype, sum(_nbytes(p) for p in params)
        elif sources is None:
            fmt, types = module.storage, module.source_types
            buffers = [] if module.qweight is None else [
                b for b in module.qweight.buffers() if id(b) not in seen]
            seen.update(id(b) for b in buffers)
            nbytes = sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in buffers)
        else:
            tied = getattr(module, "tied_to", None)  # a tied LM head: loaded as the embedding
            types = sources.get(names.get(id(tied), name), set())
            fmt = module.planned_storage(mode, types)
            out_f, in_f = module.weight.shape
            shared = fmt in RAW_FORMATS and tied is not None  # the embedding counted them
            extra = 0 if fmt == "dense" or shared else storage_bytes(fmt, out_f, in_f,
                                                                     module.weight.dtype)
            nbytes = extra + sum(_nbytes(p) for p in params
                                 if fmt == "dense" or p is not module.weight or
                                 getattr(module, "keeps_dense_weight", False))
        if matmul and getattr(module, "looks_up", False):
            kernel = type(module).__name__ + (dtype if fmt == "dense" else f" (rows of {fmt})")
        elif matmul:
            kernel = KERNELS[fmt] + (dtype if fmt == "dense" else "")
        key = (name.split(".")[-1] or "model", "+".join(sorted(types)) or "-", fmt, kernel)
        row = rows.setdefault(key, {"name": key[0], "type": key[1], "format": fmt,
                                    "kernel": kernel, "count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += nbytes
    return list(rows.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def format_weight_rows(rows: list[dict]) -> list[str]:
    total = sum(r["bytes"] for r in rows)
    lines = [f"{'weight':<24} {'count':>5}  {'type':<9} {'format':<6} {'MiB/rank':>8}  kernel"]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['count']:>5}  {r['type']:<9} {r['format']:<6} "
                     f"{r['bytes'] / 2**20:>8.2f}  {r['kernel']}")
    lines.append(f"{'total':<24} {'':>5}  {'':<9} {'':<6} {total / 2**20:>8.2f}")
    return lines
