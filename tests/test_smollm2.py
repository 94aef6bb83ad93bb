"""The real default model: SmolLM2-135M-Instruct from its GGUF file, at tp=1 and tp=3 (9 heads,
3 KV heads), compared with HF transformers on the same converted weights."""
import json
import subprocess
import sys

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.loader.resolve import resolve_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)


@pytest.fixture(scope="module")
def hf_answer():
    """HF transformers' greedy answer and logprobs on the same weights, as the reference."""
    import transformers
    model_dir = resolve_model("smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out, logprobs = list(ids), []
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            logits = model(torch.tensor([out])).logits[0, -1]
            token = int(logits.argmax())
            logprobs.append(torch.log_softmax(logits, -1)[token].item())
            out.append(token)
            if token == tok.eos_token_id:
                break
    return out[len(ids):], logprobs


@pytest.mark.parametrize("tp,sp", [(1, "off"), (3, "on")])
def test_smollm2_says_paris(hf_answer, tp, sp):
    # Dense float32 to compare with HF's float32 to 2e-4 (the default, auto, multiplies the file's
    # blocks with 8-bit activations, as llama.cpp does: tests/test_quant.py).
    with LLM("smollm2", tensor_parallel_size=tp, sequence_parallel=sp, dtype="float32",
             quantization="none", threads_per_rank=1) as llm:
        out = llm.chat(QUESTION, GREEDY)[0]
        assert "Paris" in out.text
        tokens, logprobs = hf_answer
        assert out.token_ids == tokens
        got = [step[t] for step, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(got, logprobs)) < 2e-4
        # A stop string ends generation and is cut from the text.
        stopped = llm.chat(QUESTION, SamplingParams(max_tokens=12, temperature=0, stop=["Paris"]))[0]
        assert stopped.finish_reason == "stop" and "Paris" not in stopped.text
        assert stopped.text == out.text[:out.text.index("Paris")]


def test_cli_sp_stats():
    """The issue's acceptance command: answers Paris, SP collectives only, no activation all-reduce."""
    done = subprocess.run(
        [sys.executable, "-m", "seqpar.cli", "generate", "--model", "smollm2", "-tp", "3", "--sp", "on",
         "--chat", "What is the capital of France?", "--stats", "--max-tokens", "12",
         # dense float32: the first token is a near-tie (0.08 nats) that the quantized run, like
         # llama.cpp on the same file, resolves to "L'Étoile" (tests/test_quant.py), and so does
         # the dense bf16 run on the AMX host (bf16 rounding differs between CPUs' kernels)
         "--quantization", "none", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer, _, stats = done.stdout.partition("{")
    assert "Paris" in answer
    stats = json.loads("{" + stats)["comm"]
    assert stats["all_reduce"]["calls"] == 0
    assert stats["reduce_scatter"]["calls"] > 0 and stats["all_gather"]["calls"] > 0
    assert stats["steps"]["tp"] == 0 and stats["steps"]["sp"] > 0


def test_smollm2_runs_in_bf16_by_default():
    """The Q4_1 file comes from a bf16 model: dtype="auto" runs it in bf16 where the CPU has it."""
    from seqpar.config import EngineConfig, ModelConfig, ParallelConfig, cpu_has_native_bf16

    model_dir = resolve_model("smollm2")
    cfg = EngineConfig(model_dir, ModelConfig.from_dir(model_dir), ParallelConfig())
    assert cfg.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
