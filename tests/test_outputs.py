"""The output half of the engine: delta outputs, incremental detokenization with stop strings,
prompt logprobs, and the work a long request costs (O(n) in all, not O(n^2)).

References: the tokenizer's own full decode of all the ids (transformers), cut at the first stop
string; counts of the Python memory each step allocates (tracemalloc), not times."""
from __future__ import annotations

import random
import statistics
import tracemalloc

import pytest

from seqpar import SamplingParams
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig
from seqpar.engine.detokenizer import Detokenizer
from seqpar.engine.engine import Engine
from seqpar.engine.output_processor import OutputProcessor
from seqpar.engine.outputs import OutputCollector
from seqpar.engine.sequence import Sequence
from tokenized import build_with_bytelevel_tokenizer


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return build_with_bytelevel_tokenizer("llama-gqa", tmp_path_factory.mktemp("outputs"),
                                          max_position_embeddings=2048)


@pytest.fixture(scope="module")
def tokenizer(long_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(long_model)


def _reference(tokenizer, ids: list[int], stop: list[str]) -> tuple[str, int | None]:
    """(the text up to the first stop string, the number of tokens after which a stop string
    first shows) from full decodes of growing prefixes."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in stop) if i >= 0]
        if found:
            return text[:min(found)], n
    return tokenizer.decode(ids, skip_special_tokens=True), None


@pytest.mark.parametrize("seed", range(6))
def test_detokenizer_deltas_match_a_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    # Byte tokens of multi-byte characters, words, JSON pieces and special tokens, mixed.
    text = "".join(rng.choice(["été ", "日本", '{"city": ', "Paris", " the", "\n", "✓"])
                   for _ in range(30))
    ids = tokenizer(text)["input_ids"]
    for i in rng.sample(range(len(ids)), 3):
        ids.insert(i, rng.choice([1, 2, 4]))  # special tokens: skipped in the text
    full = tokenizer.decode(ids, skip_special_tokens=True)
    # A stop string from the text's middle (it may straddle tokens), and one that never shows.
    start = rng.randrange(len(full) // 3, len(full) // 2)
    stop = [full[start:start + rng.randint(2, 6)], "@@never@@"]
    want, stops_at = _reference(tokenizer, ids, stop)

    detok = Detokenizer(tokenizer, stop)
    emitted = ""
    for n, token in enumerate(ids, 1):
        stopped = detok.add(token)
        emitted += detok.delta(finished=stopped)
        assert want.startswith(emitted), "a delta was handed out that the final text lacks"
        assert not any(s in emitted for s in stop)
        if stopped:
            break
    assert (n if stopped else None) == stops_at
    assert emitted == want


def test_held_text_is_released_at_the_end(tokenizer):
    # "Par" may begin the stop string "Paris!" and is held back until the request ends.
    detok = Detokenizer(tokenizer, ["Paris!"])
    ids = tokenizer("the Par")["input_ids"]
    pieces = []
    for token in ids:
        assert not detok.add(token)
        pieces.append(detok.delta(finished=False))
    assert "".join(pieces) == "the "
    assert detok.delta(finished=True) == "Par"


def _seq(request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
    return Sequence(request_id, 0, list(prompt), params, seed=0)


def test_processor_finish_reasons(tokenizer):
    proc = OutputProcessor(tokenizer, eos_ids={2}, max_model_len=8)
    stop_ids = tokenizer(" the Paris the")["input_ids"]
    cases = {  # request id -> (params, tokens it gets, expected finish reason, tokens it keeps)
        "eos": (SamplingParams(max_tokens=5), [300, 2, 301], "stop", 2),
        "eos-ignored": (SamplingParams(max_tokens=3, ignore_eos=True), [2, 2, 2], "length", 3),
        "max_tokens": (SamplingParams(max_tokens=2), [300, 301, 302], "length", 2),
        "max_model_len": (SamplingParams(max_tokens=50), [300] * 9, "length", 5),
        "stop string": (SamplingParams(max_tokens=9, stop=["Paris"]), stop_ids, "stop",
                        _reference(tokenizer, stop_ids, ["Paris"])[1]),
    }
    for rid, (params, tokens, reason, kept) in cases.items():
        seq = _seq(rid, [5, 6, 7], params)
        proc.add_request(seq)
        deltas = []
        for token in tokens:
            seq.token_ids.append(token)
            deltas.append(proc.process(seq, token, None))
            if deltas[-1].finished:
                break
        assert [d.finish_reason for d in deltas] == [None] * (kept - 1) + [reason], rid
        assert rid not in proc.states  # dropped when it finished
    assert "".join(d.text for d in deltas) == " the "  # the stop string and after: cut



def test_prompt_logprobs_from_the_sampler_s_chunks(long_model, tokenizer):
    """Rank 0's glue: each prefill chunk's rows through Sampler.prompt_logprobs (the sampler
    rank's) into add_prompt_logprobs, in chunks of 4, 3 and the rest, the first two computed
    twice (a preemption's recompute); the first delta holds the whole prompt's, None first, then
    HF transformers' log-softmax of each prefix (separate forwards) at the prompt token and the
    top 2."""
    import torch

    from models import _hf_model, hf_next_logprobs
    from seqpar.worker.sampler import Sampler

    prompt = [5, 17, 300, 999, 42, 8, 9, 600, 33, 71, 12]
    with torch.no_grad():  # the full-vocab rows the last stage would hand the sampler: [11, V]
        rows = _hf_model(long_model)(torch.tensor([prompt])).logits[0].float()
    params = SamplingParams(max_tokens=2, prompt_logprobs=2)
    sampler = Sampler()
    sampler.add(0, params, prompt)
    proc = OutputProcessor(tokenizer, eos_ids={2}, max_model_len=64)
    seq = _seq("p", prompt, params)
    proc.add_request(seq)
    for start, end in [(0, 4), (4, 7), (0, 4), (4, 7), (7, 11)]:
        proc.add_prompt_logprobs(seq, start, sampler.prompt_logprobs(rows[start:end], 0, start))
    with pytest.raises(ValueError, match="from position 12 arrived before position 11"):
        proc.add_prompt_logprobs(seq, 11, [{9: -4.0}])
    seq.token_ids.append(300)
    first = proc.process(seq, 300, {300: -0.5})
    assert first.logprobs == [{300: -0.5}] and first.prompt_logprobs[0] is None
    refs = hf_next_logprobs(long_model, [prompt[:i] for i in range(1, len(prompt))])
    assert len(first.prompt_logprobs) == len(prompt)
    for ref, token, entry in zip(refs, prompt[1:], first.prompt_logprobs[1:]):
        top = torch.topk(ref, 2)
        want = {**dict(zip(top.indices.tolist(), top.values.tolist())), token: ref[token].item()}
        assert entry.keys() == want.keys()
        assert [entry[t] for t in want] == pytest.approx(list(want.values()), abs=1e-4)
    seq.token_ids.append(301)
    assert proc.process(seq, 301, {301: -0.25}).prompt_logprobs is None

    # A first token before the prompt's last logprobs: the engine's bug, said, not a short list.
    seq = _seq("short", [5, 6, 7], SamplingParams(prompt_logprobs=0))
    proc.add_request(seq)
    proc.add_prompt_logprobs(seq, 0, [None, {6: -1.0}])
    seq.token_ids.append(300)
    with pytest.raises(RuntimeError, match="came with 2 of its 3 prompt logprobs"):
        proc.process(seq, 300, None)


def test_prompt_logprob_requests_skip_the_prefix_cache(long_model):
    """A cached prefix has no logits: a request asking for prompt logprobs computes its whole
    prompt (and its blocks still serve later requests)."""
    from seqpar.engine.scheduler import Scheduler

    scheduler = Scheduler(EngineConfig(long_model, ModelConfig.from_dir(long_model),
                                       ParallelConfig(), max_model_len=64, block_size=4,
                                       kv_cache_memory_bytes=1 << 20))
    prompt = list(range(5, 19))  # 14 tokens: 3 full blocks, the last token never cached

    def admit(request_id: str, params: SamplingParams) -> int:
        seq = _seq(request_id, prompt, params)
        scheduler.add(seq)
        [got], [n] = scheduler.schedule()
        assert got is seq
        seq.scheduled += n
        scheduler.complete([seq], [n])
        scheduler.finish(seq, "stop")
        return n

    assert admit("first", SamplingParams()) == 14
    assert admit("cached", SamplingParams()) == 2
    assert admit("scored", SamplingParams(prompt_logprobs=1)) == 14
    assert admit("cached again", SamplingParams()) == 2


def test_collector_folds_deltas_into_the_whole_output(tokenizer):
    proc = OutputProcessor(tokenizer, eos_ids=set(), max_model_len=100)
    seq = _seq("r", [5, 6], SamplingParams(max_tokens=6, logprobs=0))
    proc.add_request(seq)
    collector = OutputCollector("r", "the prompt", [5, 6])
    tokens = tokenizer(" été the 日本")["input_ids"][:6]
    for token in tokens:
        seq.token_ids.append(token)
        collector.add(proc.process(seq, token, {token: -1.0}))
    out = collector.result()
    assert (out.prompt, out.prompt_token_ids, out.token_ids) == ("the prompt", [5, 6], tokens)
    assert out.text == tokenizer.decode(tokens) and out.finish_reason == "length"
    assert out.logprobs == [{t: -1.0} for t in tokens]


def test_a_long_request_costs_linear_work(long_model, tokenizer):
    """2000 tokens through the engine's output half (Engine._append: the token appended, the
    output processor, the delta): each step hands out one token's worth, and allocates as much
    Python memory at token 1900 as at token 200. Cumulative outputs (the prompt, all tokens, all
    text and all logprobs copied each step) allocate in proportion to the tokens so far."""
    model_cfg = ModelConfig.from_dir(long_model)
    cfg = EngineConfig(long_model, model_cfg, ParallelConfig(), max_model_len=2048,
                       kv_cache_memory_bytes=1 << 22)
    # No ranks: only the output half runs here (the plan half is the scheduler's and the ranks').
    engine = Engine(cfg, cluster=None, policy=None, tokenizer=tokenizer, eos_ids={2})
    n = 2000
    engine.add_request("long", list(range(5, 45)), SamplingParams(
        max_tokens=n, ignore_eos=True, logprobs=2, stop=["@@never@@"]))
    seq = engine.requests["long"]
    rng = random.Random(0)
    tokens = [rng.randrange(6, 1001) for _ in range(n)]
    costs, pieces = [], []
    tracemalloc.start()
    try:
        for token in tokens:
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            delta = engine._append(seq, token, {token: -0.5, 7: -1.5, 8: -2.5})
            costs.append(tracemalloc.get_traced_memory()[1] - start)
            assert delta.token_ids == [token] and len(delta.logprobs) == 1
            pieces.append(delta.text)
    finally:
        tracemalloc.stop()
    assert delta.finish_reason == "length" and "long" not in engine.requests
    assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)
    # Bytes allocated per step (the median: a list that grows reallocates now and then).
    early, late = statistics.median(costs[100:300]), statistics.median(costs[1800:2000])
    assert late <= 1.2 * early + 64, f"a step allocates {early} B at token ~200, {late} B at ~1900"


def test_what_the_engine_cannot_honour_is_refused(long_model, tokenizer):
    """Settings the engine cannot honour are a ValueError naming them (a grammar xgrammar cannot
    build names why)."""
    from seqpar.sampling_params import StructuredOutputsParams

    cfg = EngineConfig(long_model, ModelConfig.from_dir(long_model), ParallelConfig(),
                       max_model_len=64, kv_cache_memory_bytes=1 << 20)
    engine = Engine(cfg, cluster=None, policy=None, tokenizer=tokenizer, eos_ids={2})
    for params, said in [
            (SamplingParams(structured_outputs=StructuredOutputsParams(regex="(?<=a)b")),
             "Lookbehind is not supported"),
            # More top tokens than any client reads: each is two columns of the sampler's rows.
            (SamplingParams(logprobs=5000), "logprobs=5000: at most 20 top tokens"),
            (SamplingParams(prompt_logprobs=21), "prompt_logprobs=21: at most 20")]:
        with pytest.raises(ValueError, match=said):
            engine.add_request("r", [5, 6], params)
        assert not engine.requests
    engine = Engine(cfg, cluster=None, policy=None, tokenizer=None, eos_ids={2})
    with pytest.raises(ValueError, match="structured_outputs needs the model's tokenizer"):
        engine.add_request("r", [5, 6], SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="[0-9]+")))
