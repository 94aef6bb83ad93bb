"""Mixture-of-experts families against HF transformers on the same weights: tp 1-3, SP off / on /
auto, expert parallelism off / on; each step's bytes against the analytic minimum (with EP an SP
step all-to-alls its tokens and gathers none for the MoE); a pipeline; what is refused.

One LLM per (family, tp, EP), EP being fixed at start-up; the SP mode is switched between calls.
"""
import multiprocessing

import pytest

from models import MOE_FAMILIES, assert_matches, build, hf_reference, valid_tp
from seqpar import LLM, SamplingParams
from seqpar_bench import analytic
from seqpar.cli import main as cli

MAX_TOKENS = 4
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
# Odd lengths and prompts longer than the 8-token step budget (chunked), so SP pads and steps
# mix prefill chunks with decodes.
PROMPTS = [[(7 * i + 5 * n) % 900 + 3 for i in range(n)] for n in (1, 2, 5, 7, 13)]
_reference = {}


def reference(model_dir):
    if model_dir not in _reference:
        _reference[model_dir] = hf_reference(model_dir, PROMPTS, MAX_TOKENS)
    return _reference[model_dir]


def open_llm(model_dir, tp, ep, pp=1):
    # SP off at start-up (no threshold measurement); the tests set the mode per call.
    return LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp,
               sequence_parallel="off", max_num_batched_tokens=8, threads_per_rank=1,
               enable_expert_parallel=ep)


def one_step_bytes(llm, mode, tokens):
    """comm_stats of one prefill step of `tokens` tokens in SP mode `mode`, by op (nonzero)."""
    llm.policy.mode = mode
    llm.reset_comm_stats()
    llm.generate([list(range(3, 3 + tokens))], SamplingParams(max_tokens=1, temperature=0.0))
    stats = llm.comm_stats()
    assert stats["steps"]["sp" if mode == "on" else "tp"] == 1
    return {op: v["bytes"] for op, v in stats.items() if op != "steps" and v["bytes"]}


CASES = [(f, tp, ep) for f in sorted(MOE_FAMILIES) for tp in valid_tp(f)
         for ep in ([False, True] if tp > 1 else [False])]


@pytest.mark.parametrize("family,tp,ep", CASES)
def test_matches_hf(tiny_root, family, tp, ep):
    model_dir = build(family, tiny_root)
    expected = reference(model_dir)
    with open_llm(model_dir, tp, ep) as llm:
        # "auto" at threshold 6 mixes TP steps (decodes, short chunks) with SP steps.
        modes = [("off", None), ("on", None), ("auto", 6)] if tp > 1 else [("off", None)]
        for mode, threshold in modes:
            llm.policy.mode, llm.policy.threshold = mode, threshold
            what = f"{family} tp={tp} sp={mode} ep={'on' if ep else 'off'}"
            llm.reset_comm_stats()
            assert_matches(llm.generate(PROMPTS, GREEDY), expected, what)
            steps = llm.comm_stats()["steps"]
            if mode == "auto":
                assert steps["tp"] > 0 and steps["sp"] > 0, what + ": should mix TP and SP steps"
            if mode == "on":  # one token a step: the other ranks' shards are all padding
                assert_matches(llm.generate(PROMPTS[:1], GREEDY), expected[:1], what + " T=1")
        if tp == 1:
            return
        cfg = llm.cfg.model
        assert cfg.expert_parallel == ep
        # One prefill step of 7 tokens (tp does not divide it) per mode: exactly the analytic
        # minimum, op by op. With EP an SP step's MoE blocks all-to-all [7 x k, H] each way and
        # gather nothing: its all-gathers are attention's, the dense layers' and the LM head's.
        for mode in ("off", "on"):
            measured = one_step_bytes(llm, mode, 7)
            assert measured == analytic.comm_minimum(cfg, [7], tp, sp=mode == "on"), mode
        moe_layers, k, h = len(cfg.moe_layers), cfg.num_experts_per_tok, cfg.hidden_size
        gathers = llm.comm_stats()["all_gather"]["calls"]
        if ep:
            routed = 2 * 7 * k * h * 4  # dispatch + combine, float32
            assert measured["all_to_all"] == moe_layers * (tp * cfg.num_experts * 8 + routed)
            assert gathers == 2 * cfg.num_layers + 1 - moe_layers
        else:
            assert "all_to_all" not in measured
            assert gathers == 2 * cfg.num_layers + 1


def test_pipeline_with_experts_matches_hf(tiny_root):
    """qwen2-moe's 3 layers (MoE, dense, MoE) over 2 stages x 2 TP ranks, expert parallel."""
    model_dir = build("qwen2-moe", tiny_root)
    expected = reference(model_dir)
    with open_llm(model_dir, 2, True, pp=2) as llm:
        for mode in ("off", "on"):
            llm.policy.mode = mode
            llm.reset_comm_stats()
            what = f"qwen2-moe tp=2 pp=2 sp={mode} ep"
            assert_matches(llm.generate(PROMPTS, GREEDY), expected, what)
            stats = llm.comm_stats()
            assert stats["send"]["calls"] > 0
            assert (stats["all_to_all"]["calls"] > 0) == (mode == "on")


def test_refused_before_any_rank_starts(tiny_root):
    uneven = build("qwen3-moe", tiny_root, num_experts=4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3: 4 experts do not divide evenly "
                                         r"over 3 ranks"):
        open_llm(uneven, 3, True)
    with pytest.raises(ValueError, match=r"compile=True does not support mixture-of-experts "
                                         r"models \(mixtral, 6 experts\)"):
        LLM(str(build("mixtral", tiny_root)), tensor_parallel_size=2, compile=True)
    with pytest.raises(ValueError, match=r"enable_expert_parallel=True needs a mixture-of-experts"):
        open_llm(build("qwen3", tiny_root), 2, True)
    assert multiprocessing.active_children() == []


def test_check_shows_the_moe_block_per_mode(tiny_root, capsys):
    model = str(build("qwen2-moe", tiny_root))
    assert cli(["check", "--model", model, "-tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "MoE        2 MoE layers (1 dense): 6 experts x 24 wide, top-2, a shared expert" in out
    assert "per rank every expert, 12 of its 24 columns" in out
    assert "SP step: all_gather" in out and "sequence parallelism: supported" in out
    assert cli(["check", "--model", model, "-tp", "2", "--enable-expert-parallel"]) == 0
    out = capsys.readouterr().out
    assert "per rank 3 whole experts (expert parallel)" in out
    assert "all_to_all dispatch" in out and "no all-gather" in out
    assert cli(["check", "--model", model, "-tp", "3", "--compile"]) == 2
    assert "compile=True does not support mixture-of-experts" in capsys.readouterr().err
