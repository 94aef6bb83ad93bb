"""The per-rank batch state (worker/batch.py) and the step format (worker/plan.py): deltas that
round-trip and rebuild each step exactly as the scheduler decided it, a missed or misapplied delta
failing loudly (on one state, and on one rank of a running engine), and m logit rows per sequence
matching HF transformers' full logits, TP and SP."""
import random

import pytest
import torch
import torch.distributed as dist
import transformers

from dist_helpers import run_ranks
from models import paged_kv
from seqpar import LLM, SamplingParams
from seqpar.config import ModelConfig
from seqpar.distributed.comm import Comm
from seqpar.engine.sequence import Sequence
from seqpar.models import MODELS
from seqpar.worker.batch import BatchState
from seqpar.worker.plan import ChecksumMismatch, StepDelta, StepWriter

BS = 4


def _seq(key: int, n: int, rng: random.Random) -> Sequence:
    return Sequence(f"r{key}", key, [rng.randrange(1000) for _ in range(n)],
                    SamplingParams(temperature=0.0), seed=key)


def _schedule(rng, seqs, free_blocks, decode=False):
    """A random step over seqs: a chunk (or one decode token; only those when decode) for some,
    blocks handed out as needed; returns (chosen, counts)."""
    chosen, counts = [], []
    for seq in rng.sample(seqs, rng.randint(1, len(seqs))):
        left = seq.num_tokens - seq.scheduled
        if left == 0:
            seq.token_ids.append(rng.randrange(1000))  # "sampled" since its last step
            left = 1
        n = 1 if decode else rng.randint(1, left)
        while len(seq.block_table) * BS < seq.scheduled + n:
            seq.block_table.append(free_blocks.pop())
        chosen.append(seq)
        counts.append(n)
    return chosen, counts


def _expected(seq: Sequence, start: int, n: int):
    """The step's token ids, positions and slots of seq, from its own lists."""
    pos = list(range(start, start + n))
    return (seq.token_ids[start:start + n], pos,
            [seq.block_table[p // BS] * BS + p % BS for p in pos])


def test_deltas_rebuild_every_step():
    """Random steps (chunks, decodes, preemptions, finishes) through encode / decode: each rank's
    plan has the tokens, positions, slots, block tables and logit rows the scheduler chose,
    computed here from the sequences' own lists."""
    rng = random.Random(0)
    writer, state = StepWriter(), BatchState(8, 16, BS, 2, "cpu")
    free = list(range(200))
    rng.shuffle(free)
    live = [_seq(k, rng.randint(1, 20), rng) for k in range(4)]
    next_key = 4
    for step in range(60):
        seqs, counts = _schedule(rng, live, free, decode=step % 3 == 0)
        rows = [rng.randint(0, n) for n in counts]
        want = [_expected(s, s.scheduled, n) for s, n in zip(seqs, counts)]
        draws = [s.scheduled + n == s.num_tokens for s, n in zip(seqs, counts)]
        delta = writer.write(seqs, counts, rows, sp=rng.random() < 0.5, overlap=False)
        for s, n in zip(seqs, counts):
            s.scheduled += n
        plan = state.apply(StepDelta.decode(delta.encode()))
        assert plan.token_ids.tolist() == sum((w[0] for w in want), [])
        assert plan.positions.tolist() == sum((w[1] for w in want), [])
        assert plan.attn_metadata.slot_mapping.tolist() == sum((w[2] for w in want), [])
        tables = plan.attn_metadata.block_tables
        for b, s in enumerate(seqs):
            used = -(-s.scheduled // BS)
            assert tables[b, :used].tolist() == s.block_table[:used]
        assert plan.attn_metadata.seq_lens.tolist() == [s.scheduled for s in seqs]
        assert (plan.keys, plan.lens, plan.logit_rows, plan.draws) == (
            [s.key for s in seqs], counts, rows, draws)
        assert state.requests.keys() == writer.held.keys()
        # Now and then a sequence ends (finished) or is preempted (recomputed from 0 later).
        if rng.random() < 0.2:
            gone = live.pop(rng.randrange(len(live)))
            free += gone.block_table
            if rng.random() < 0.5:
                writer.finish(gone.key)
                live.append(_seq(next_key, rng.randint(1, 20), rng))
                next_key += 1
            else:
                writer.drop(gone.key)
                gone.block_table, gone.scheduled = [], 0
                live.append(gone)


def _two_steps():
    rng = random.Random(1)
    writer, state = StepWriter(), BatchState(4, 8, BS, 1, "cpu")
    seqs = [_seq(0, 6, rng), _seq(1, 3, rng)]
    free = list(range(20))
    deltas = []
    for _ in range(3):
        chosen, counts = _schedule(rng, seqs, free)
        deltas.append(writer.write(chosen, counts, [1] * len(chosen), False, False))
        for s, n in zip(chosen, counts):
            s.scheduled += n
    return state, deltas


def test_missed_delta_fails_loudly():
    state, deltas = _two_steps()
    state.apply(deltas[0])
    with pytest.raises(ChecksumMismatch, match="step message 2 arrived where 1 was expected"):
        state.apply(deltas[2])


def test_misapplied_delta_fails_loudly():
    state, deltas = _two_steps()
    state.apply(deltas[0])
    state.requests[0].computed -= 1  # this rank's state drifted from rank 0's
    with pytest.raises(ChecksumMismatch, match="differs from rank 0's"):
        state.apply(deltas[1])


def test_engine_rank_missing_a_delta_raises(tiny):
    """tp=2: rank 0's own worker skips one step's delta (the other rank applies it); the next
    step raises a clear error, not a wrong answer, and the LLM is closed."""
    llm = LLM(str(tiny("qwen2")), tensor_parallel_size=2, threads_per_rank=1, max_model_len=64)
    worker = llm.engine.cluster.worker.runner
    applied = worker.batch.apply
    skipped = []

    def skip_once(delta):
        if delta.step == 3 and not skipped:
            skipped.append(delta.step)
            return applied(StepDelta(delta.step + 1000, 0, False, False))  # never matches
        return applied(delta)

    worker.batch.apply = skip_once
    with pytest.raises(ChecksumMismatch, match="was expected"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert skipped == [3]
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))


# ---- m logit rows per sequence against HF's full logits ----------------------------------------

PROMPTS = [[3, 17, 40, 99, 5], [12, 61, 8, 7, 250, 33]]
LOGIT_ROWS = [3, 6]  # the first's last 3 rows, every row of the second


def _logit_rows(rank, world, model_dir):
    """Rank 0: per SP mode, the logits of one prefill step of both prompts (5 + 6 = 11 rows, not
    a multiple of 2) with LOGIT_ROWS rows each, then a step of 3 more tokens of the first (after
    its cached 5) with all 3 rows; built through StepWriter / BatchState."""
    cfg = ModelConfig.from_dir(model_dir)
    model = MODELS[cfg.model_type](cfg, Comm(dist.group.WORLD, rank, world), torch.float32, 64)
    model.load_weights(model_dir)
    out = {}
    for sp in (False, True):
        paged_kv(model, num_blocks=8, block_size=BS)
        writer, state = StepWriter(), BatchState(4, 16, BS, world, "cpu")
        seqs = [Sequence(f"r{i}", i, list(p), SamplingParams(), 0) for i, p in enumerate(PROMPTS)]
        seqs[0].token_ids += [77, 21, 400]
        seqs[0].block_table, seqs[1].block_table = [0, 1], [2, 3]
        steps = []
        for chosen, counts, rows in ((seqs, [5, 6], LOGIT_ROWS), ([seqs[0]], [3], [3])):
            chosen[0].block_table += [4] if len(steps) else []
            delta = writer.write(chosen, counts, rows, sp, False)
            for s, n in zip(chosen, counts):
                s.scheduled += n
            with torch.inference_mode():
                steps.append(model(state.apply(StepDelta.decode(delta.encode()))))
        out[sp] = steps
    return out if rank == 0 else None


@pytest.mark.parametrize("world", [2])
def test_logit_rows_match_hf_full_logits(tiny, world):
    model_dir = tiny("llama-gqa")
    got = run_ranks(_logit_rows, world, model_dir, timeout=300)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        full = [hf(torch.tensor([PROMPTS[0] + [77, 21, 400]])).logits[0],  # [8, V]
                hf(torch.tensor([PROMPTS[1]])).logits[0]]                  # [6, V]
    want_prefill = torch.cat([full[0][5 - 3:5], full[1]])  # [3 + 6, V]
    for sp, (prefill, verify) in got.items():
        assert prefill.shape == want_prefill.shape and verify.shape == (3, full[0].shape[1])
        assert (prefill - want_prefill).abs().max() < 1e-4, f"sp={sp}: prefill rows differ"
        assert (verify - full[0][5:8]).abs().max() < 1e-4, f"sp={sp}: the 3-row chunk differs"
