"""One peer engine (vLLM's CPU engine or llama.cpp) serving the bench from a Python of its own.

    PEER_PYTHON peer_driver.py ENGINE CONFIG_JSON REPLY_FD

Run as a file by the peer's interpreter (its own venv: vLLM pins a torch and transformers of its
own), so it imports neither seqpar nor seqpar_bench. Requests arrive one JSON line at a time on
stdin ({"method": "generate", "args": [prompts, n]} or {"method": "close"}); each reply is one JSON
line on REPLY_FD ({"ok": value} or {"error": traceback}), apart from stdout, where the engines log.
generate(prompts, n) returns the seconds to generate n tokens for every prompt (token ids, greedy,
EOS ignored), timed here, inside the process doing the work.
"""
import itertools
import json
import os
import sys
import time
import traceback


class Vllm:
    """vllm.LLM at its own defaults but for the options in `config` (the bench passes the model,
    tp, dtype, max_model_len and prefix caching off)."""

    def __init__(self, config: dict):
        from vllm import LLM, SamplingParams
        self.params = SamplingParams
        self.llm = LLM(**config)

    def generate(self, prompts: list, n: int) -> float:
        params = self.params(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0

    def close(self) -> None:
        del self.llm


class LlamaCpp:
    """llama-cpp-python on one GGUF file, one sequence at a time (its Python API has no batch of
    independent sequences), greedy."""

    def __init__(self, config: dict):
        from llama_cpp import Llama
        n_ctx, threads = config["n_ctx"], config["threads"]
        # n_batch = n_ctx: a prompt goes in as one batch, as seqpar prefills it in one step
        self.llm = Llama(model_path=config["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def generate(self, prompts: list, n: int) -> float:
        if len(prompts) != 1:
            raise ValueError(f"llama.cpp runs one sequence at a time, got {len(prompts)}")
        self.llm.reset()  # n_tokens = 0: generate() finds no prefix to reuse
        t0 = time.perf_counter()
        # temp=0: its greedy sampler; the n-th token is sampled, not evaluated (islice stops)
        for _ in itertools.islice(self.llm.generate(prompts[0], temp=0.0, reset=True), n):
            pass
        return time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


ENGINES = {"vllm": Vllm, "llama.cpp": LlamaCpp}


def main() -> None:
    engine, config, fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    os.set_inheritable(fd, False)  # the engine's own workers must not hold the reply pipe open
    reply = os.fdopen(fd, "w", buffering=1)

    def send(**kw):
        reply.write(json.dumps(kw) + "\n")

    try:
        peer = ENGINES[engine](config)
        send(ok=None)
    except BaseException:
        send(error=traceback.format_exc())
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request["method"] == "close":
            peer.close()
            send(ok=None)
            return
        try:
            send(ok=getattr(peer, request["method"])(*request["args"]))
        except Exception:
            send(error=traceback.format_exc())


if __name__ == "__main__":  # vLLM spawns processes: they must not re-run this
    main()
