"""Pipeline parallelism, alone and with TP and SP: against HF transformers, the bytes that cross a
stage boundary, steps in flight, validation, and a dying stage."""
import multiprocessing
import os
import signal
import threading
import time

import pytest

from models import build, chosen_logprobs, hf_reference
from seqpar import LLM, SamplingParams
from seqpar.cli import main as cli
from seqpar.config import ParallelConfig, round_up

MAX_TOKENS = 5
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
# Lengths tp does not divide (SP pads) and prompts longer than the 16-token step budget (chunked),
# so steps mix prefill chunks and decodes.
PROMPTS = [[(5 * i + 11 * n) % 900 + 3 for i in range(n)] for n in (1, 3, 6, 7, 13, 23)]


def open_llm(model_dir, tp, pp):
    # SP off at start-up (no measurement); the tests switch the mode per call.
    return LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp,
               sequence_parallel="off", max_num_batched_tokens=16, threads_per_rank=1)


def assert_matches_hf(llm, model_dir, what):
    expected = hf_reference(model_dir, PROMPTS, MAX_TOKENS)
    modes = ["off", "on"] if llm.cfg.parallel.tensor_parallel_size > 1 else ["off"]
    for mode in modes:
        llm.policy.mode = mode
        llm.reset_comm_stats()
        # The whole batch, then the longest prompt alone: its chunks follow one another through
        # the stages, and a single request is served with the same results.
        got = llm.generate(PROMPTS, GREEDY) + llm.generate([PROMPTS[-1]], GREEDY)
        for i, (out, (tokens, logprobs)) in enumerate(zip(got, expected + expected[-1:])):
            where = f"{what} sp={mode}: prompt {i}"
            assert out.token_ids == tokens, f"{where}: greedy tokens differ from HF"
            worst = max(abs(a - b) for a, b in zip(chosen_logprobs(out), logprobs))
            assert worst < 2e-4, f"{where}: logprob differs from HF by {worst:.2e}"
        stats = llm.comm_stats()
        assert stats["steps"]["tp" if mode == "on" else "sp"] == 0
        assert stats["send"]["calls"] > 0 and stats["send"] == stats["recv"]


@pytest.mark.parametrize("family,layers,tp,pp", [
    ("llama-mqa-tied", 2, 1, 2),  # tied embeddings: the last stage loads the embedding as LM head
    ("llama-mqa-tied", 2, 2, 2),  # and with its single KV head replicated over 2 TP ranks
    ("qwen3", 4, 1, 3),           # a middle stage: layers 0-1 | 2 | 3
])
def test_matches_hf(tiny_root, family, layers, tp, pp):
    model_dir = build(family, tiny_root, num_hidden_layers=layers)
    with open_llm(model_dir, tp, pp) as llm:
        assert_matches_hf(llm, model_dir, f"{family} ({layers} layers) tp={tp} pp={pp}")


@pytest.fixture(scope="module")
def model_dir(tiny_root):
    return build("qwen3", tiny_root, num_hidden_layers=4)


@pytest.fixture(scope="class")
def llm(model_dir):
    """Closed at the end of its class: one LLM with several ranks runs at a time."""
    with open_llm(model_dir, 2, 2) as llm:
        yield llm


class TestTwoStagesOfTwo:
    """tp=2 x pp=2 on a 4-layer Qwen3 (q/k norms, untied): two layers per stage."""

    def test_matches_hf(self, llm, model_dir):
        assert_matches_hf(llm, model_dir, "qwen3 (4 layers) tp=2 pp=2")

    @pytest.mark.parametrize("tokens", [8, 7])
    def test_sp_boundary_bytes_are_one_tp_th(self, llm, tokens):
        """One step of `tokens` tokens. Per TP rank the boundary carries hidden + residual: with SP
        its token shard [T_pad/2, H] each, without SP the full [T, H] each."""
        hidden, tp = 48, 2
        # The one sampled row's token (+ its logprob), from the last stage to rank 0: [1, 2]
        # float64, not the row's [1, vocab] float32 logits.
        logits = 1 * 2 * 8
        boundary = {}
        for mode in ("on", "off"):
            llm.policy.mode = mode
            llm.reset_comm_stats()
            llm.generate([list(range(3, 3 + tokens))], SamplingParams(max_tokens=1, temperature=0))
            stats = llm.comm_stats()
            assert stats["send"]["calls"] == tp + 1  # each TP rank's boundary message + the token
            assert stats["recv"] == stats["send"]
            boundary[mode] = stats["send"]["bytes"] - logits
        padded = round_up(tokens, tp)
        assert boundary["on"] == tp * 2 * (padded // tp) * hidden * 4
        assert boundary["off"] == tp * 2 * tokens * hidden * 4
        if tokens % tp == 0:
            assert boundary["on"] * tp == boundary["off"]

    def test_batches_in_flight(self, llm):
        """Four prompts decoding: each step takes half of them, so the two stages each hold a
        step: twice the steps of a single stage, for the same tokens."""
        llm.policy.mode = "off"
        llm.reset_comm_stats()
        outs = llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=4, temperature=0,
                                                            ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [4] * 4
        assert len({tuple(o.token_ids) for o in outs}) == 1
        assert llm.comm_stats()["steps"]["tp"] == 2 * 4


def test_stage_layers_are_contiguous_and_balanced():
    for layers, pp, sizes in [(30, 4, [8, 8, 7, 7]), (2, 2, [1, 1]), (4, 3, [2, 1, 1]), (5, 1, [5])]:
        ranges = [ParallelConfig(pipeline_parallel_size=pp).stage_layers(layers, s) for s in range(pp)]
        assert [len(r) for r in ranges] == sizes
        assert [i for r in ranges for i in r] == list(range(layers))


def test_pp_above_layer_count_fails_before_start(tiny):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 exceeds num_hidden_layers=2"):
        LLM(str(tiny("qwen2")), pipeline_parallel_size=3, threads_per_rank=1)
    assert multiprocessing.active_children() == []


def test_check_prints_stage_layout(tiny, capsys):
    assert cli(["check", "--model", str(tiny("llama-gqa")), "-tp", "2", "-pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 0    ranks 0-1: layer 0, embedding" in out
    assert "stage 1    ranks 2-3: layer 1, final norm, LM head" in out
    assert cli(["check", "--model", str(tiny("llama-gqa")), "-pp", "3"]) == 2
    assert "pipeline_parallel_size=3 exceeds num_hidden_layers=2" in capsys.readouterr().err


def test_killed_stage_makes_driver_raise(tiny):
    llm = LLM(str(tiny("llama-gqa")), pipeline_parallel_size=2, threads_per_rank=1)
    (last,) = [p.pid for p in llm.cluster.spawner.procs]

    def kill_when_running():
        while llm.engine.steps["tp"] < 3:
            time.sleep(0.01)
        os.kill(last, signal.SIGKILL)

    threading.Thread(target=kill_when_running, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"seqpar-rank1 killed by signal 9"):
        llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=240, temperature=0, ignore_eos=True))
    assert time.monotonic() - start < 30
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5]], SamplingParams(max_tokens=1))
