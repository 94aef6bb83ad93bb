"""Record llama.cpp's greedy tokens on the smollm2 Q4_1 GGUF, the reference of tests/test_quant.py.

llama.cpp is not installed by `make test`; this ran once, in a venv of its own:

    python3 -m venv /work/wt/peers/llama
    CMAKE_ARGS=-DGGML_NATIVE=ON /work/wt/peers/llama/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/python tests/data/record_llama_cpp.py prompts      # seqpar's chat template -> ids
    /work/wt/peers/llama/bin/python tests/data/record_llama_cpp.py record GGUF_FILE

`prompts` writes each chat prompt's token ids (seqpar's tokenizer and chat template) into
smollm2_llama_cpp.json; `record` feeds those ids to llama.cpp, 2 threads, greedy (top_k 1, no
repeat penalty), and adds per step the token it chose and the gap between its two largest logits.
"""
import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("smollm2_llama_cpp.json")
PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Write a haiku about the sea.", "What is 12 times 7?",
           "Explain photosynthesis in one sentence.", "Give me a synonym for happy."]
MAX_TOKENS = 32


def prompts() -> None:
    from seqpar.loader.resolve import resolve_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    cases = [{"prompt": p, "prompt_token_ids": list(tok.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"])} for p in PROMPTS]
    OUT.write_text(json.dumps({"cases": cases}, indent=1) + "\n")


def record(gguf_file: str) -> None:
    import llama_cpp
    import numpy as np

    data = json.loads(OUT.read_text())
    llm = llama_cpp.Llama(model_path=gguf_file, n_ctx=512, n_threads=2, logits_all=True,
                          verbose=False, seed=0)
    for case in data["cases"]:
        llm.reset()
        ids, gaps = [], []
        for token in llm.generate(case["prompt_token_ids"], temp=0.0, top_k=1,
                                  repeat_penalty=1.0, reset=True):
            top2 = np.sort(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64))[-2:]
            ids.append(int(token))
            gaps.append(round(float(top2[1] - top2[0]), 4))
            if token == llm.token_eos() or len(ids) == MAX_TOKENS:
                break
        case["llama_cpp_token_ids"], case["llama_cpp_logit_gaps"] = ids, gaps
    data["recorded_with"] = (f"llama-cpp-python {llama_cpp.__version__}, GGML_NATIVE=ON, "
                             f"n_threads=2, greedy; {Path(gguf_file).name}")
    OUT.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    prompts() if sys.argv[1] == "prompts" else record(sys.argv[2])
