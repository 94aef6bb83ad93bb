"""Record llama.cpp's ggml_mul_mat on tensors of the smollm2 Q4_1 GGUF, the reference of
tests/test_quant.py test_gguf_blocks_equal_ggml_on_the_default_file.

llama.cpp is not installed by `make test`; this ran once, in the venv of record_llama_cpp.py:

    .venv/bin/python tests/data/record_ggml_mul_mat.py inputs      # the file's bytes, seeded x
    VENV/bin/python tests/data/record_ggml_mul_mat.py record       # ggml's CPU mul_mat on them

`inputs` writes, per case, a tensor name, the bytes of its first `rows` rows and inputs x [M, K]
(seeded normal values with one outlier channel, float32 bytes) into ggml_mul_mat.json; `record`
runs ggml_mul_mat (the CPU backend of llama-cpp-python's own libggml, through ctypes: the public
ggml C API) on those rows and inputs and adds y [M, rows] (float32 bytes).
"""
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("ggml_mul_mat.json")
CASES = [("blk.0.attn_q.weight", 16, 1), ("blk.0.ffn_gate.weight", 16, 5),
         ("blk.3.ffn_down.weight", 16, 3), ("token_embd.weight", 32, 2)]


def _tensors() -> dict:
    import gguf
    from seqpar.loader.resolve import gguf_source
    return {t.name: t for t in gguf.GGUFReader(gguf_source("smollm2")).tensors}


def inputs() -> None:
    tensors, cases = _tensors(), []
    for i, (name, rows, m) in enumerate(CASES):
        t = tensors[name]
        x = np.random.default_rng(i).standard_normal((m, int(t.shape[0])), dtype=np.float32)
        x[:, 5] *= 30
        cases.append({"tensor": name, "type": int(t.tensor_type), "rows": rows,
                      "bytes": np.ascontiguousarray(t.data[:rows]).tobytes().hex(),
                      "x": x.tobytes().hex()})
    OUT.write_text(json.dumps({"cases": cases}) + "\n")


def record() -> None:
    import llama_cpp
    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                    ("no_alloc", ctypes.c_bool)]

    ptr = ctypes.c_void_p
    base.ggml_init.restype, base.ggml_init.argtypes = ptr, [InitParams]
    base.ggml_new_tensor_2d.restype = ptr
    base.ggml_new_tensor_2d.argtypes = [ptr, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = ptr, [ptr] * 3
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = ptr, [ptr]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = ptr, [ptr]
    base.ggml_build_forward_expand.argtypes = [ptr] * 2
    cpu.ggml_graph_compute_with_ctx.argtypes = [ptr, ptr, ctypes.c_int]
    cpu.ggml_cpu_init()
    data = json.loads(OUT.read_text())
    for case in data["cases"]:
        raw = np.frombuffer(bytes.fromhex(case["bytes"]), np.uint8).reshape(case["rows"], -1)
        x = np.frombuffer(bytes.fromhex(case["x"]), np.float32).reshape(-1, raw.shape[1] // (
            20 if case["type"] == 3 else 34) * 32)
        ctx = base.ggml_init(InitParams(64 << 20, None, False))
        w = base.ggml_new_tensor_2d(ctx, case["type"], x.shape[1], raw.shape[0])
        ctypes.memmove(base.ggml_get_data(w), raw.ctypes.data, raw.nbytes)
        xt = base.ggml_new_tensor_2d(ctx, 0, x.shape[1], x.shape[0])  # GGML_TYPE_F32
        ctypes.memmove(base.ggml_get_data(xt), x.ctypes.data, x.nbytes)
        y = base.ggml_mul_mat(ctx, w, xt)  # [M, rows]
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, 2)
        out = ctypes.cast(base.ggml_get_data(y), ctypes.POINTER(ctypes.c_float))
        case["y"] = np.ctypeslib.as_array(out, shape=(x.shape[0], raw.shape[0])).tobytes().hex()
        base.ggml_free.argtypes = [ptr]
        base.ggml_free(ctx)
    data["recorded_with"] = (f"llama-cpp-python {llama_cpp.__version__} (ggml CPU backend, "
                             "AVX-512 VNNI, no AMX), 2 threads; SmolLM2-135M-Instruct.Q4_1.gguf")
    OUT.write_text(json.dumps(data) + "\n")


if __name__ == "__main__":
    inputs() if sys.argv[1] == "inputs" else record()
