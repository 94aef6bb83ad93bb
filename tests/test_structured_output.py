"""Structured outputs (seqpar/structured_output.py) against xgrammar itself and on a real model.

The module's bitmask rows are compared with xgrammar's own matcher on its own compilation, the
masking with a pure-torch reading of the bits; then HF transformers' tiny random model, greedy
and sampled, masked by the module at each step, must write outputs that parse and validate
(jsonschema) where the same model unmasked does not: only the grammar makes them valid."""
from __future__ import annotations

import json
import re

import pytest
import torch

from seqpar.sampling_params import SamplingParams, StructuredOutputsParams
from seqpar.structured_output import (GrammarCompiler, allocate_bitmask, apply_bitmask,
                                      validate)
from tokenized import build_with_bytelevel_tokenizer

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

EOS = 2
VOCAB = 1001
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 8},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}},
          "required": ["city", "n", "ok"], "additionalProperties": False}
REGEX = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
CHOICE = ["Paris", "Lyon", "日本"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_with_bytelevel_tokenizer("llama-gqa", tmp_path_factory.mktemp("grammar"))


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, {EOS})


def test_bad_specs_are_refused_with_xgrammar_s_reason():
    for spec, why in [
            (StructuredOutputsParams(json={"type": "bogus"}), 'Unsupported type "bogus"'),
            (StructuredOutputsParams(json="{not json"), "Failed to parse JSON"),
            (StructuredOutputsParams(regex="(?<=a)b"), "Lookbehind is not supported"),
            (StructuredOutputsParams(grammar="root ::= item"), 'Rule "item" is not defined')]:
        with pytest.raises(ValueError, match=re.escape(why)) as e:
            validate(spec)
        assert "/project/" not in str(e.value)  # xgrammar's C++ source location is dropped
    for kwargs, said in [({}, "got none"), ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
                         ({"choice": []}, "non-empty list of strings")]:
        with pytest.raises(ValueError, match=said):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a"))


def test_compiled_grammars_are_cached(compiler):
    spec = StructuredOutputsParams(json=SCHEMA)
    compiler.compile(spec)
    size = compiler.compiler.get_cache_size_bytes()
    compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA)))  # the same grammar
    assert compiler.compiler.get_cache_size_bytes() == size
    compiler.compile(StructuredOutputsParams(regex=REGEX))
    assert compiler.compiler.get_cache_size_bytes() > size


def _allowed(bitmask_row: torch.Tensor) -> torch.Tensor:
    """A bitmask row [ceil(V / 32)] int32 -> [V] bool, bit t of word t // 32 (pure torch)."""
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:VOCAB].bool()


def test_bitmask_rows_and_masking_match_xgrammar(tokenizer, compiler):
    # xgrammar's own path: its tokenizer info, compiler and matcher, built here.
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
    theirs = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False))
    ours = compiler.matcher(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    text = '{"city": "Paris", "n": 42, "ok": true}'
    mine, ref = allocate_bitmask(3, VOCAB), xgr.allocate_token_bitmask(1, VOCAB)
    for token in [*tokenizer(text)["input_ids"], EOS]:
        ours.fill_bitmask(mine, 1)
        theirs.fill_next_token_bitmask(ref, 0)
        assert torch.equal(mine[1], ref[0])
        assert _allowed(mine[1])[token]
        ours.accept(token)
        assert theirs.accept_token(token)
    assert ours.is_terminated()
    with pytest.raises(RuntimeError, match="breaks the request's grammar"):
        compiler.matcher(StructuredOutputsParams(choice=CHOICE)).accept(EOS)

    # Only the rows named are masked: -inf where the bit is clear, the rest untouched.
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    apply_bitmask(logits, mine, [1])
    allowed = _allowed(mine[1])
    assert torch.equal(logits[1][allowed], before[1][allowed])
    assert bool((logits[1][~allowed] == float("-inf")).all())
    assert torch.equal(logits[[0, 2]], before[[0, 2]])


def _generate(model_dir, prompt: list[int], matcher, max_tokens: int, temperature: float,
              seed: int = 0) -> list[int]:
    """HF transformers' forward, one token at a time, the grammar's mask applied to the logits
    before the greedy or sampled choice (what the sampler rank does); matcher None: unmasked."""
    from models import _hf_model

    hf = _hf_model(model_dir)
    generator = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, VOCAB)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf(torch.tensor([ids])).logits[0, -1:].float()  # [1, V]
            if matcher is not None:
                matcher.fill_bitmask(bitmask, 0)
                apply_bitmask(logits, bitmask, [0])
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(token)
            if matcher is not None:
                matcher.accept(token)
            if token == EOS:
                break
    return ids[len(prompt):]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != EOS])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_masked_generation_is_always_valid(model, tokenizer, compiler, temperature):
    prompt = tokenizer("the capital of france is")["input_ids"]
    unmasked = _text(tokenizer, _generate(model, prompt, None, 30, temperature))
    with pytest.raises(json.JSONDecodeError):
        json.loads(unmasked)  # the random model alone writes no JSON
    assert not re.fullmatch(REGEX, unmasked) and unmasked not in CHOICE

    for seed in range(2):
        spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
        out = _generate(model, prompt, compiler.matcher(spec), 60, temperature, seed)
        assert out[-1] == EOS, "the grammar completed and allowed only EOS"
        jsonschema.validate(json.loads(_text(tokenizer, out)), SCHEMA)

        out = _generate(model, prompt, compiler.matcher(StructuredOutputsParams(regex=REGEX)),
                        40, temperature, seed)
        assert re.fullmatch(REGEX, _text(tokenizer, out))

        out = _generate(model, prompt, compiler.matcher(StructuredOutputsParams(choice=CHOICE)),
                        20, temperature, seed)
        assert _text(tokenizer, out) in CHOICE

    # json_object: any object; an unbounded grammar, so some samples run out of tokens first.
    if temperature:
        ended = 0
        for seed in range(3):
            out = _generate(model, prompt, compiler.matcher(StructuredOutputsParams(
                json_object=True, disable_any_whitespace=True)), 200, temperature, seed)
            if out[-1] == EOS:
                ended += 1
                assert isinstance(json.loads(_text(tokenizer, out)), dict)
        assert ended


# ---- the sampler rank's factory --------------------------------------------------------------

PADDED = 1040
"""A logits width past the tokenizer's 1001 ids (models pad their vocab: Qwen2's 151936 logits
for a 151665-token tokenizer)."""
GRAMMAR = 'root ::= term ("+" term){0,3}\nterm ::= [1-9] [0-9]{0,2}'
GRAMMAR_REGEX = r"[1-9][0-9]{0,2}(\+[1-9][0-9]{0,2}){0,3}"
"""The EBNF grammar's language, written apart as a Python regex (the independent check)."""


@pytest.fixture
def factory(model):
    import dataclasses

    from seqpar.config import ModelConfig
    from seqpar.structured_output import GrammarFactory

    return GrammarFactory(model, dataclasses.replace(ModelConfig.from_dir(model),
                                                     vocab_size=PADDED))


def _sample_masked(matcher, temperature: float, seed: int, max_tokens: int) -> list[int]:
    """What the sampler rank does with a matcher, on random logits [1, PADDED] whose padded ids
    (no token of the tokenizer) would win every unmasked draw: mask, greedy or sampled choice,
    accept; until the grammar terminates (a stop token accepted) or max_tokens."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, PADDED)
    out = []
    for _ in range(max_tokens):
        logits = 4 * torch.randn(1, PADDED, generator=gen)
        logits[0, VOCAB:] += 100
        matcher.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask, [0])
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits[0] / temperature, -1), 1,
                                          generator=gen))
        matcher.accept(token)
        out.append(token)
        if matcher.is_terminated():
            break
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_factory_matchers_make_random_logits_valid(factory, tokenizer, temperature):
    assert factory(0, SamplingParams()) is None  # no grammar: no matcher
    assert factory._compiler is None, "the compiler is built for the first grammar only"
    # (spec, check of the text, bounded: must end within 120 tokens; random logits write keys
    # and strings of a free object hundreds of tokens long: 400, and about half the samples end)
    cases = [
        (StructuredOutputsParams(json=SCHEMA),
         lambda t: jsonschema.validate(_json(t), SCHEMA), True),
        (StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
         lambda t: isinstance(_json(t), dict) or pytest.fail(t), False),
        (StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t),
         True),
        (StructuredOutputsParams(choice=CHOICE), lambda t: t in CHOICE or pytest.fail(t), True),
        (StructuredOutputsParams(grammar=GRAMMAR),
         lambda t: re.fullmatch(GRAMMAR_REGEX, t) or pytest.fail(t), True),
    ]
    for spec, check, bounded in cases:
        ended = 0
        for seed in range(8):
            out = _sample_masked(factory(seed, SamplingParams(structured_outputs=spec)),
                                 temperature, seed, 120 if bounded else 400)
            assert all(t < VOCAB for t in out), "a padded id got through the mask"
            if out[-1] != EOS:
                assert not bounded, f"{spec} did not end in 120 tokens"
                continue
            # The grammar ended on the engine's EOS (the config's and tokenizer's eos id): rank 0
            # finishes the request on it as on any EOS.
            ended += 1
            assert EOS not in out[:-1]
            check(_text(tokenizer, out))
        assert ended, f"{spec}: no sample ended"


def test_a_complete_grammar_allows_only_eos_and_rolls_back(factory, tokenizer):
    """How a request ends: once its grammar is complete, the mask allows the engine's EOS only
    (rank 0 finishes on it as on any EOS). Rolled back (a verification's rejected drafts), the
    grammar allows its other branch again."""
    matcher = factory(7, SamplingParams(structured_outputs=StructuredOutputsParams(
        choice=["Lyon", "Paris"])))
    bitmask = allocate_bitmask(1, PADDED)
    paris = tokenizer("Paris")["input_ids"]
    for t in paris:
        matcher.accept(t)
    matcher.fill_bitmask(bitmask, 0)
    assert _allowed_padded(bitmask[0]).nonzero().flatten().tolist() == [EOS]
    matcher.accept(EOS)
    assert matcher.is_terminated()
    matcher.rollback(len(paris) + 1)  # back to the start: "Lyon" possible again
    lyon = tokenizer("Lyon")["input_ids"]
    matcher.fill_bitmask(bitmask, 0)
    assert bool(_allowed_padded(bitmask[0])[lyon[0]])
    for t in [*lyon, EOS]:
        matcher.accept(t)
    assert matcher.is_terminated()


def _json(text: str):
    """JSON as xgrammar's JSON grammar writes it: its strings admit raw control characters
    (U+0000-U+001F), which strict JSON forbids and random logits do pick (a model rarely)."""
    return json.loads(text, strict=False)


def _allowed_padded(bitmask_row: torch.Tensor) -> torch.Tensor:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:PADDED].bool()


def test_factory_needs_a_tokenizer(tmp_path):
    from models import build
    from seqpar.config import ModelConfig
    from seqpar.structured_output import GrammarFactory

    bare = build("llama-gqa", tmp_path)  # weights and config only
    factory = GrammarFactory(bare, ModelConfig.from_dir(bare))
    assert factory(0, SamplingParams()) is None
    with pytest.raises(ValueError, match="need the model's tokenizer"):
        factory(1, SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))


def test_json_whitespace_runs_are_bounded(factory, tokenizer):
    """A model that loves whitespace (every whitespace-only token 30 logits up, greedy) still
    writes the object: JSON with whitespace allowed caps each run at MAX_JSON_WHITESPACE."""
    from seqpar.structured_output import MAX_JSON_WHITESPACE

    spaces = [t for t in range(VOCAB) if (s := tokenizer.decode([t])) and not s.strip()]
    assert len(spaces) > 10
    matcher = factory(0, SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    gen = torch.Generator().manual_seed(0)
    bitmask = allocate_bitmask(1, PADDED)
    out = []
    while not matcher.is_terminated():
        assert len(out) < 300, repr(_text(tokenizer, out))
        logits = torch.randn(1, PADDED, generator=gen)
        logits[0, spaces] += 30
        matcher.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask, [0])
        out.append(int(logits.argmax()))
        matcher.accept(out[-1])
    text = _text(tokenizer, out)
    jsonschema.validate(_json(text), SCHEMA)
    runs = re.findall(r"\s+", text)
    assert max(map(len, runs)) <= MAX_JSON_WHITESPACE < max(map(len, runs)) + 8, runs


@pytest.mark.parametrize("pp", [1, 2])
def test_llm_outputs_follow_their_grammars(model, tokenizer, pp):
    """LLM.generate at tp 1: a batch of grammar requests (json schema, regex, choice; greedy and
    sampled) beside a plain greedy one, whose tokens stay HF's (its row is not masked). pp 2:
    the masks are applied on the last stage's sampler rank."""
    from models import hf_reference
    from seqpar import LLM

    prompt = tokenizer("the capital of france is")["input_ids"]
    specs = [StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(regex=REGEX),
             StructuredOutputsParams(choice=CHOICE)]
    params = [SamplingParams(max_tokens=120, temperature=t, seed=s, structured_outputs=spec)
              for spec in specs for t, s in [(0.0, None), (1.0, 1), (1.0, 2)]]
    plain = SamplingParams(max_tokens=8, temperature=0)
    with LLM(str(model), threads_per_rank=1, max_model_len=256,
             pipeline_parallel_size=pp) as llm:
        outs = llm.generate([prompt] * (len(params) + 1), params + [plain])
    for out, p in zip(outs, params):
        spec = p.structured_outputs
        assert out.finish_reason == "stop", out.text
        if spec.json is not None:
            jsonschema.validate(_json(out.text), SCHEMA)
        elif spec.regex is not None:
            assert re.fullmatch(REGEX, out.text)
        else:
            assert out.text in CHOICE
    want = hf_reference(model, [prompt], 8)[0][0]
    got = outs[-1].token_ids
    assert got == want[:len(got)] and (len(got) == 8 or got[-1] == EOS)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_sampler_masks_with_the_factory_s_matchers(factory, tokenizer, temperature):
    """worker/sampler.py's Sampler(grammar=factory), as the sampler rank runs it: grammar rows
    (json schema, regex, choice, EBNF) beside a plain row in every step, on random logits whose
    padded ids would win unmasked, until each grammar row ends on EOS; then speculative
    verification: drafts the grammar allows are kept, a forbidden one is rejected and rolled
    back, and the request still ends valid."""
    from seqpar.worker.sampler import Sampler

    checks = {1: (StructuredOutputsParams(json=SCHEMA),
                  lambda t: jsonschema.validate(_json(t), SCHEMA) is None),  # raises if not
              2: (StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
              3: (StructuredOutputsParams(choice=CHOICE), lambda t: t in CHOICE),
              4: (StructuredOutputsParams(grammar=GRAMMAR),
                  lambda t: re.fullmatch(GRAMMAR_REGEX, t))}
    sampler = Sampler(seed=0, grammar=factory)
    for key, (spec, _) in checks.items():
        sampler.add(key, SamplingParams(temperature=temperature, structured_outputs=spec))
    sampler.add(9, SamplingParams(temperature=temperature))
    gen = torch.Generator().manual_seed(1)
    outs, live = {key: [] for key in checks}, list(checks)
    for _ in range(120):
        keys = live + [9]
        logits = 4 * torch.randn(len(keys), PADDED, generator=gen)
        logits[:, VOCAB:] += 100
        tokens = sampler.sample(logits, keys).tokens.tolist()
        assert tokens[-1] >= VOCAB, "the plain row was masked"
        for key, token in zip(live, tokens):
            outs[key].append(token)
        live = [key for key in live if outs[key][-1] != EOS]
        if not live:
            break
    assert not live, f"{live} did not end in 120 tokens"
    for key, (_, check) in checks.items():
        assert check(_text(tokenizer, outs[key])), outs[key]

    # Verification, greedy, the logits favouring chosen tokens. "Paris" EOS: both kept (EOS
    # completes the grammar: no final token). "L" "y" "on" EOS under choice Lyon | Ly, the
    # logits choosing EOS after "Ly": "on" and EOS, accepted tentatively, are rolled back, and
    # EOS ends "Ly". "N"...: rejected at once for a token the grammar allows.
    def choice(*options):
        return SamplingParams(temperature=0,
                              structured_outputs=StructuredOutputsParams(choice=list(options)))

    paris, lyon = [*tokenizer("Paris")["input_ids"], EOS], [*tokenizer("Lyon")["input_ids"], EOS]
    nice = tokenizer("Nice")["input_ids"]
    sampler.add(5, choice(*CHOICE))
    sampler.add(6, choice("Lyon", "Ly"))
    sampler.add(7, choice(*CHOICE))
    favoured = [*paris, 0, *lyon[:2], EOS, 0, 0, *nice, 0]
    logits = torch.randn(len(favoured), PADDED, generator=gen)
    logits[torch.arange(len(favoured)), favoured] += 50
    kept, ly, corrected = sampler.verify(logits, [5, 6, 7], [paris, lyon, nice])
    assert kept == paris and ly == [*lyon[:2], EOS]
    assert _text(tokenizer, ly) == "Ly"
    assert corrected[0] != nice[0] and len(corrected) == 1
    out = corrected
    while out[-1] != EOS:
        out += sampler.sample(torch.randn(1, PADDED, generator=gen), [7]).tokens.tolist()
        assert len(out) < 20
    assert _text(tokenizer, out) in CHOICE


def test_preempted_grammar_requests_keep_their_grammar_state(model, tokenizer):
    """A KV pool of 32 blocks of 4 tokens for eight grammar requests of ~50 tokens each: decoding
    runs out of blocks and the newest are preempted mid-output, then recomputed. The sampler
    rank keeps a returning request's matcher and generator where they were (a preemption is not
    a release), so every output still validates, and each request's tokens, greedy or seeded,
    are the ones it writes with room for all (no preemption). One asks for prompt logprobs too:
    its recompute after the first token has no prompt rows (the sampler would refuse them)."""
    from seqpar import LLM
    from seqpar.config import EngineConfig, ModelConfig, ParallelConfig

    prompt = tokenizer("the capital of france is")["input_ids"]
    params = [SamplingParams(max_tokens=100, temperature=t, seed=s,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA),
                             prompt_logprobs=2 if i == 7 else None)
              for i, (t, s) in enumerate([(0.0, None), (1.0, 1), (0.7, 2), (1.0, 3)] * 2)]
    block = EngineConfig(model, ModelConfig.from_dir(model), ParallelConfig(),
                         block_size=4).kv_block_bytes
    outs = {}
    for blocks in (32, 400):
        with LLM(str(model), threads_per_rank=1, max_model_len=128, block_size=4,
                 kv_cache_memory_bytes=blocks * block) as llm:
            outs[blocks] = llm.generate([prompt] * len(params), params)
            preemptions = llm.cache_stats()["preemptions"]
        assert (preemptions > 0) == (blocks == 32), (blocks, preemptions)
    for tight, roomy in zip(outs[32], outs[400]):
        assert tight.finish_reason == "stop", tight.text
        jsonschema.validate(_json(tight.text), SCHEMA)
        assert tight.token_ids == roomy.token_ids
    tight, roomy = outs[32][7].prompt_logprobs, outs[400][7].prompt_logprobs
    assert len(tight) == len(prompt) and tight[0] is None
    for a, b in zip(tight[1:], roomy[1:]):
        assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()),
                                                                          abs=1e-5)
