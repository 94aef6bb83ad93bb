"""llama-architecture GGUF files: converted once to an HF-style directory, and read directly.

convert_gguf dequantizes the file to float32 a single time and caches it as `model.safetensors` +
`config.json` + tokenizer files: the config and tokenizer every run needs, and the weights of
quantization="none" / "int8" / "int4" (and of the benchmark's peers, which read HF directories).

GGUFCheckpoint reads the file itself, memory-mapped, for quantization="auto" / "gguf": each rank
reads only the blocks of its shard (rows of a column-parallel weight, whole blocks of columns of
a row-parallel one), under HF names and in HF row order, and a tensor of a type with a kernel
(ggml_blocks.KERNEL_TYPES) hands its blocks over decoded to integers, never dequantized.
"""

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from seqpar.loader.ggml_blocks import (FLOAT_TYPES, KERNEL_TYPES, RAW_TYPES, Affine, Blocks,
                                       block_size, decode)

SUPPORTED_ARCHITECTURES = ("llama",)

# Per-layer GGUF names ("blk.N.<name>.weight") -> HF names ("model.layers.N.<hf>.weight").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Model-level GGUF names -> HF names. `output` is absent when embeddings are tied.
_MODEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight, token_embd.weight -> ..."""
    base, suffix = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    if suffix == "weight":
        is_layer = len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit()
        if is_layer and parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
        if base in _MODEL_NAMES:
            return f"{_MODEL_NAMES[base]}.weight"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order of attn_q / attn_k.

    HF's rotary embedding pairs row i of a head with row i + head_dim/2 (rotate_half); llama.cpp
    pairs rows 2i and 2i+1, so its converter interleaves the two halves of every head. Shapes stay
    the same either way, which is why a missed unpermute only shows up as wrong outputs.
    w: [n_heads * head_dim, hidden], GGUF row order -> HF row order.
    """
    half = w.shape[0] // n_heads // 2
    # GGUF [n_heads, half, 2, hidden]: rows i and i + half of a head sit next to each other
    # -> HF [n_heads, 2, half, hidden]: each half of a head is contiguous
    return w.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


class GGUFTensor:
    """One GGUF tensor under its HF name, sliced like a safetensors slice: `t[rows]` or
    `t[rows, cols]` -> float32 torch tensor of just those rows and columns (dequantized), and,
    for a type with a kernel, `t.quantized(rows, cols)` -> the same part as Blocks (RAW_TYPES: the
    file's bytes) or an Affine (None
    otherwise). Rows are HF rows: attn_q / attn_k rows are unpermuted per head, so a slice of
    them must hold whole heads."""

    def __init__(self, tensor, head_dim: int | None):
        self.type = tensor.tensor_type.name
        self._data = tensor.data  # [rows, bytes per row] uint8 (quantized) or [rows, cols] memmap
        self._shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists [in, out]
        self._head_dim = head_dim  # attn_q / attn_k: rows come in llama.cpp's rotary order
        self.quantized = self._quantized if self.type in KERNEL_TYPES else None

    def get_shape(self) -> tuple[int, ...]:
        return self._shape

    def _rows(self, rows: slice) -> range:
        rows = range(*rows.indices(self._shape[0]))
        if self._head_dim and (rows.start % self._head_dim or len(rows) % self._head_dim):
            raise ValueError(f"rows {rows.start}-{rows.stop} of a rotary projection cut a head "
                             f"of {self._head_dim} rows")
        return rows

    def _hf_order(self, a: np.ndarray) -> np.ndarray:
        return a if self._head_dim is None else _unpermute(a, a.shape[0] // self._head_dim)

    def _quantized(self, rows: slice, cols: slice) -> Affine | Blocks:
        rows = self._rows(rows)
        start, stop, _ = cols.indices(self._shape[-1])
        # The whole blocks covering the columns; an Affine keeps the columns asked for.
        per_block = block_size(self.type)
        first, last = start // per_block, -(-stop // per_block)
        nbytes = self._data.shape[1] // (self._shape[-1] // per_block)
        raw = self._data[rows.start:rows.stop, first * nbytes:last * nbytes]
        if self.type in RAW_TYPES:
            if start % per_block or stop % per_block:
                raise ValueError(f"columns {start}-{stop} cut a quantization block of "
                                 f"{per_block}")
            return Blocks(self._hf_order(np.ascontiguousarray(raw)), self.type)
        a = decode(raw, self.type)
        lo, hi = start - first * per_block, stop - first * per_block
        if lo % a.group or hi % a.group:
            raise ValueError(f"columns {start}-{stop} cut a quantization group of {a.group}")
        return Affine(*(self._hf_order(np.ascontiguousarray(x)) for x in
                        (a.q[:, lo:hi], a.scale[:, lo // a.group:hi // a.group],
                         a.min[:, lo // a.group:hi // a.group])), bits=a.bits, group=a.group)

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if len(self._shape) == 1:
            return torch.from_numpy(np.array(self._data[rows], dtype=np.float32))
        if self.quantized is not None:
            part = self.quantized(rows, cols)
            return torch.from_numpy((part.affine() if isinstance(part, Blocks) else part).values())
        rows = self._rows(rows)
        part = self._data[rows.start:rows.stop]
        if self.type not in FLOAT_TYPES:  # whole rows: any type's blocks lie within a row
            part = gguf.quants.dequantize(part, gguf.GGMLQuantizationType[self.type])
        return torch.from_numpy(self._hf_order(np.array(part[:, cols], dtype=np.float32)))


class GGUFCheckpoint:
    """A GGUF file opened like safetensors' safe_open: keys() (HF names) and get_slice(name)."""

    def __init__(self, path: Path):
        reader = _read_gguf(Path(path))
        arch = _meta(reader, "general.architecture")
        heads = int(_meta(reader, f"{arch}.attention.head_count"))
        hidden = int(_meta(reader, f"{arch}.embedding_length"))
        head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
        self._tensors = {}
        for t in reader.tensors:
            rotary = t.name.endswith((".attn_q.weight", ".attn_k.weight"))
            self._tensors[_hf_name(t.name)] = GGUFTensor(t, head_dim if rotary else None)

    def keys(self):
        return self._tensors.keys()

    def get_slice(self, name: str) -> GGUFTensor:
        return self._tensors[name]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tensors = {}  # the reader's memory maps close with their last reference


def tensor_types(path: Path) -> dict[str, str]:
    """HF tensor name -> GGUF type name ("Q4_1", "F32", ...), from the file's index only. Read
    once per file version: parsing the default model's index takes about 2 s here, and an engine's
    configuration asks for it several times before any rank starts."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        _read_gguf(path)  # raises the ValueError that names the file
        raise
    return dict(_tensor_types(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _tensor_types(path: Path, size: int, mtime_ns: int) -> dict[str, str]:
    """tensor_types of one version of a file (size and mtime_ns key the cache)."""
    return {_hf_name(t.name): t.tensor_type.name for t in _read_gguf(path).tensors}


_REQUIRED = object()


def _meta(reader: gguf.GGUFReader, key: str, default=_REQUIRED):
    """One metadata value as a Python object; raises if a required key is absent."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def _compute_dtype(reader: gguf.GGUFReader) -> str:
    """The dtype the model is meant to run in, written as config.json's torch_dtype (what
    dtype="auto" follows): float32 for an all-F32 file, float16 / bfloat16 for 16-bit ones, and
    bfloat16 for quantized files, whose weights come from 16-bit models and carry fewer bits than
    bf16 holds once dequantized. The safetensors stay float32 either way (exact dequantization)."""
    types = {t.tensor_type for t in reader.tensors}
    kinds = gguf.GGMLQuantizationType
    if types <= {kinds.F32}:
        return "float32"
    if types <= {kinds.F32, kinds.F16}:
        return "float16"
    return "bfloat16"


def _read_gguf(path: Path) -> gguf.GGUFReader:
    """The file's header, metadata and tensor index; a truncated or corrupt file raises a
    ValueError naming it (the gguf library's errors name no path)."""
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into `out_dir` (HF Llama layout, float32). Returns `out_dir`.

    The directory appears atomically: everything is written into a temporary sibling and renamed
    at the end, so an interrupted conversion never leaves a half cache. If `out_dir` appears in the
    meantime (another rank converted the same file), that copy is kept.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = _read_gguf(gguf_path)
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported; "
            f"seqpar supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    n_layers = int(_meta(reader, f"{arch}.block_count"))
    n_heads = int(_meta(reader, f"{arch}.attention.head_count"))
    n_kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // n_heads))
    rope_dim = int(_meta(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"{gguf_path.name}: partial rotary ({rope_dim} of {head_dim} dims) is not supported"
        )
    rope_scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"{gguf_path.name}: rope scaling {rope_scaling!r} is not supported")

    tensors: dict[str, np.ndarray] = {}
    desc = f"seqpar: converting {gguf_path.name} (first start only)"
    for t in tqdm(reader.tensors, desc=desc, unit="tensor"):
        name = _hf_name(t.name)
        # dequantize returns torch order: [out_features, in_features] (GGUF lists [in, out]).
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if t.name.endswith(".attn_q.weight"):
            w = _unpermute(w, n_heads)  # [n_heads * head_dim, hidden]
        elif t.name.endswith(".attn_k.weight"):
            w = _unpermute(w, n_kv_heads)  # [n_kv_heads * head_dim, hidden]
        tensors[name] = np.ascontiguousarray(w)  # F32 tensors are read-only views of the mmap

    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{hf}.weight" for i in range(n_layers) for hf in _LAYER_NAMES.values()
    }
    if missing := sorted(expected - tensors.keys()):
        raise ValueError(f"{gguf_path.name}: {len(missing)} tensors missing, e.g. {missing[:3]}")

    rope_theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        # stored as float32 in GGUF: 1e-5 reads back as 9.999999747378752e-06, like transformers'
        "rms_norm_eps": float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length")),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _compute_dtype(reader),
    }
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if reader.get_field("tokenizer.ggml.model") is not None:  # else prompts are token ids
            _save_tokenizer(gguf_path, tmp, _meta(reader, "tokenizer.chat_template", None))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"seqpar: cached {gguf_path.name} as float32 safetensors in {out_dir}", file=sys.stderr)
    return out_dir


def _save_tokenizer(gguf_path: Path, out_dir: Path, chat_template: str | None) -> None:
    # transformers rebuilds a fast tokenizer from the GGUF vocab and merges; imported here
    # because only the first start needs it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if chat_template and not tok.chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
