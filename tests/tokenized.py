"""A tiny random checkpoint with a real tokenizer (and a chat template), built locally: the
server's text and chat endpoints need one, and no tokenizer can be downloaded here."""
from __future__ import annotations

from pathlib import Path

from models import FAMILIES, build

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an "
         "they which one you were her all she there would their we him been has when who will more "
         "no if out so said what up its about into than them can only other new some could time "
         "these two may then do first any my now such like our over man me even most made after "
         "hello world paris france capital city river king queen red blue green cat dog").split()


def build_with_tokenizer(family: str, root: Path) -> Path:
    """The checkpoint of models.build(family) plus a word-level tokenizer whose vocab is the
    model's: ids 0-2 are <unk> <s> </s> (the configs' bos 1 and eos 2), then chat role markers,
    English words and filler words w<i>. Words decode whole, so any id sequence decodes to text
    that a longer sequence's text extends."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out = build(family, root)
    if (out / "tokenizer.json").is_file():
        return out
    size = FAMILIES[family][1]["vocab_size"]
    words = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", *WORDS]
    words += [f"w{i}" for i in range(size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out)
    return out


# A chat template that renders tools, tool calls and tool results the way Hermes / Qwen templates
# do (the tools' JSON in a system turn, calls as <tool_call>{...}</tool_call>).
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|system|> tools: {% for t in tools %}{{ t | tojson }} {% endfor %}"
    "call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call> </s> {% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus() -> list[str]:
    """Text a byte-level BPE learns its merges from: English words, JSON, numbers, accents."""
    import json
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    for i in range(300):
        obj = {rng.choice(WORDS): rng.choice([rng.randint(-999, 999), rng.choice(WORDS), True,
                                              None, [1, 2.5], {"city": "Paris"}])
               for _ in range(3)}
        lines.append(json.dumps(obj) + " " + json.dumps(obj, indent=2))
    # Made-up words: enough distinct pairs for the merges a ~1000-token vocab needs.
    lines += [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
                       for _ in range(10)) for _ in range(300)]
    lines += ["été naïve café über 日本 ✓ " * 3, "<tool_call>{\"name\": \"f\"}</tool_call>"]
    return lines


def build_with_bytelevel_tokenizer(family: str, root: Path, added: tuple[str, ...] = (),
                                   **overrides) -> Path:
    """models.build(family, **overrides) plus a byte-level BPE tokenizer (GPT-2 / Llama-3 /
    Qwen style) trained here on a small corpus, exactly as large as the model's vocab: any text,
    JSON included, can be written with it, and multi-byte characters span several tokens.
    added: extra whole tokens (like Qwen's <tool_call>), appended last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import hashlib

    tag = hashlib.sha1("|".join(added).encode()).hexdigest()[:8]
    out = build(family, root / f"bytelevel-{tag}", **overrides)
    if (out / "tokenizer.json").is_file():
        return out
    size = overrides.get("vocab_size", FAMILIES[family][1]["vocab_size"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size - len(added), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    assert tok.get_vocab_size() == size - len(added), "the corpus is too small for the vocab"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", chat_template=TOOLS_CHAT_TEMPLATE)
    fast.add_tokens(list(added))
    fast.save_pretrained(out)
    return out


TOOL_CALL_TURN = (" Let me check.", "<tool_call>", '{"name": "get_weather", "arguments": ',
                  '{"city": "Paris"}}', "</tool_call>")
"""What build_tool_caller's model writes after <|assistant|>, one added token each, then EOS."""


def build_tool_caller(root: Path, **overrides) -> Path:
    """A checkpoint made to write a Hermes tool call: build_with_bytelevel_tokenizer's model with
    TOOL_CALL_TURN's pieces as whole tokens, its attention and MLP outputs zeroed (o_proj,
    down_proj), so the last hidden state is the current token's embedding, and its LM head set
    so that greedy decoding follows <|assistant|> -> TOOL_CALL_TURN -> EOS. Any prompt that ends
    with <|assistant|> (a chat turn) gets that answer."""
    import torch
    import transformers

    out = build_with_bytelevel_tokenizer("llama-gqa", root, added=TOOL_CALL_TURN, **overrides)
    if (out / "tool_caller").is_file():
        return out
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    chain = [tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", *TOOL_CALL_TURN)]
    chain.append(tokenizer.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        for a, b in zip(chain, chain[1:]):
            # logit of b after a: 8 |e_a| . rmsnorm(e_a) = 8 sqrt(H), far above any other.
            model.lm_head.weight[b] = 8 * embed[a] / embed[a].norm()
    model.save_pretrained(out)
    (out / "tool_caller").touch()
    return out
