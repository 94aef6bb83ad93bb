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
