"""GGML's quantized block formats, decoded into per-group affine integers at load time.

Every type kept quantized (KERNEL_TYPES) decodes, for a run of whole blocks of some rows, into
`Affine(q, scale, min)`: unsigned integers q [R, C] of `bits` bits and one scale and one offset per
group of `group` consecutive columns, with w = scale * q + min exactly as llama.cpp (and the gguf
library's dequantize) compute each type's value:

    type   block  bits  group  value in the file                   scale       min
    Q4_0     32     4     32   d * (q - 8)                          d           -8 d
    Q4_1     32     4     32   d * q + m                            d           m
    Q5_0     32     5     32   d * (q - 16)                         d           -16 d
    Q5_1     32     5     32   d * q + m                            d           m
    Q8_0     32     8     32   d * q, q signed                      d           -128 d (q + 128)
    Q4_K    256     4     32   d * sc_j * q - dmin * m_j            d * sc_j    -dmin * m_j
    Q5_K    256     5     32   d * sc_j * q - dmin * m_j            d * sc_j    -dmin * m_j
    Q6_K    256     6     16   d * sc_j * (q - 32), sc_j signed     d * sc_j    -32 d sc_j

d, m, dmin are float16; sc_j, m_j the 6-bit (K types) or int8 (Q6_K) sub-block scales. Every
product above is exact in float32 (at most 11 + 8 + 6 significant bits), so scale * q + min
rounds once, where the gguf library rounds once too. The layouts are llama.cpp's `block_*`
structs (ggml-common.h); seqpar/layers/quant.py turns these integers into torch's kernel formats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T


@dataclass
class Affine:
    """w = scale * q + min, per group of `group` columns: q [R, C] uint8, scale and min
    [R, C / group] float32."""
    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray
    bits: int
    group: int

    def values(self) -> np.ndarray:
        """The float32 weights [R, C] (for tests and the dense fallback)."""
        g = self.group
        q = self.q.reshape(self.q.shape[0], -1, g).astype(np.float32)
        return (q * self.scale[..., None] + self.min[..., None]).reshape(self.q.shape)


@dataclass
class Blocks:
    """Whole blocks of one RAW_TYPES type as the file holds them: raw [R, blocks * bytes] uint8."""
    raw: np.ndarray
    type_name: str

    @property
    def rows(self) -> int:
        return self.raw.shape[0]

    def affine(self) -> Affine:
        return decode(self.raw, self.type_name)


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 little-endian float16 -> [...] float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """[..., count / 8] bytes -> [..., count] single bits, little-endian (bit i of the whole)."""
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def _q4_0(b: np.ndarray):  # [R, B, 18]: d, qs[16]
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18]), d, -8 * d


def _q4_1(b: np.ndarray):  # [R, B, 20]: d, m, qs[16]
    return _nibbles(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _q5_0(b: np.ndarray):  # [R, B, 22]: d, qh (32 high bits), qs[16]
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4), d, -16 * d


def _q5_1(b: np.ndarray):  # [R, B, 24]: d, m, qh, qs[16]
    q = _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4)
    return q, _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _q8_0(b: np.ndarray):  # [R, B, 34]: d, qs[32] signed
    d = _f16(b[..., 0:2])
    return (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4):
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 from
    the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7."""
    lo, hi = s[..., 0:4], s[..., 4:8]
    sc = np.concatenate([lo & 63, (s[..., 8:12] & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (s[..., 8:12] >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant_groups(b: np.ndarray, low: np.ndarray):
    """The shared tail of Q4_K / Q5_K: low [R, B, 256] values -> q, scale, min per 32."""
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    return low, d * sc, -(dmin * mn)


def _q4_k(b: np.ndarray):  # [R, B, 144]: d, dmin, scales[12], qs[128]
    # qs holds 4 chunks of 32 bytes; chunk i's low nibbles are sub-block 2i, its high 2i + 1.
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    return _k_quant_groups(b, _nibbles(qs).reshape(*b.shape[:-1], 256))


def _q5_k(b: np.ndarray):  # [R, B, 176]: d, dmin, scales[12], qh[32], qs[128]
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    # Bit j of qh[l] is the fifth bit of element l of sub-block j.
    high = _bits(b[..., 16:48, None], 8)  # [R, B, 32 (l), 8 (j)]
    high = np.moveaxis(high, -1, -2).reshape(*b.shape[:-1], 256)
    return _k_quant_groups(b, _nibbles(qs).reshape(*b.shape[:-1], 256) | (high << 4))


def _q6_k(b: np.ndarray):  # [R, B, 210]: ql[128], qh[64], scales[16] int8, d
    lead = b.shape[:-1]
    # Two halves of 128 values; in half h, element l + 32 k (k < 4) takes its low 4 bits from
    # ql[64 h + l + 32 (k % 2)] (low nibble for k < 2, high for k >= 2) and its top 2 bits from
    # bits 2k..2k+1 of qh[32 h + l].
    ql = b[..., 0:128].reshape(*lead, 2, 2, 32)  # [.., half, k % 2, l]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)  # [.., half, 1, l]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # [.., half, k, l]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    q = (low | (high << 4)).reshape(*lead, 256)
    d = _f16(b[..., 208:210])[..., None]
    scale = d * b[..., 192:208].view(np.int8).astype(np.float32)  # [.., 16]: per 16 values
    return q, scale, -32 * scale


# type -> (decoder of [R, blocks, bytes] -> (q [R, B, block], scale, min [R, B, groups]),
#          bits, group)
_DECODERS = {
    T.Q4_0: (_q4_0, 4, 32), T.Q4_1: (_q4_1, 4, 32), T.Q5_0: (_q5_0, 5, 32),
    T.Q5_1: (_q5_1, 5, 32), T.Q8_0: (_q8_0, 8, 32), T.Q4_K: (_q4_k, 4, 32),
    T.Q5_K: (_q5_k, 5, 32), T.Q6_K: (_q6_k, 6, 16),
}
KERNEL_TYPES = frozenset(t.name for t in _DECODERS)
RAW_TYPES = frozenset({"Q4_1", "Q8_0"})
"""Types multiplied in the file's own blocks (layers/quant.py GGUFBlocks, llama.cpp's arithmetic);
the other KERNEL_TYPES are decoded into Affine integers for torch's int4 kernel."""
"""GGUF tensor types that stay quantized (quantization="auto" / "gguf"); any other quantized
type is dequantized at load, with a warning naming it."""
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


def bits_of(type_name: str) -> int:
    """Bits per value of a type with a kernel (Q6_K: 6, requantized to 8 in groups of 32)."""
    return _DECODERS[T[type_name]][1]


def block_size(type_name: str) -> int:
    """Elements per block of a GGUF type (32, or 256 for the K types)."""
    return GGML_QUANT_SIZES[T[type_name]][0]


def decode(raw: np.ndarray, type_name: str) -> Affine:
    """raw [R, blocks * bytes per block] uint8, whole blocks of R rows -> Affine over those
    blocks' columns."""
    qtype = T[type_name]
    decoder, bits, group = _DECODERS[qtype]
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = np.asarray(raw).reshape(rows, -1, nbytes)
    q, scale, mn = decoder(blocks)
    # [R, B, groups per block] (a one-group type returns [R, B]) -> [R, B * groups]
    scale, mn = (np.asarray(a, np.float32).reshape(rows, blocks.shape[1], -1) for a in (scale, mn))
    assert scale.shape[-1] == elements // group
    return Affine(q.reshape(rows, -1).astype(np.uint8), scale.reshape(rows, -1),
                  mn.reshape(rows, -1), bits, group)
