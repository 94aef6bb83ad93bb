"""The model's tokenizer, as the engine and the server use it: loading, EOS ids, text -> ids and
chat templates (with tools)."""
from __future__ import annotations

import json
from pathlib import Path

from seqpar.config import ModelConfig


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or None when it ships none (prompts are token ids then)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer  # slow import: only where a tokenizer exists
    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: Path, cfg: ModelConfig, tokenizer) -> set[int]:
    """Every id that ends generation: the config's, generation_config.json's and the tokenizer's."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode(tokenizer, text: str, what: str = "prompt") -> list[int]:
    """Token ids of a text prompt (ValueError when the model has no tokenizer)."""
    if tokenizer is None:
        raise ValueError(f"{what} is text but the model has no tokenizer files; pass token ids "
                         "instead")
    return as_ids(tokenizer(text)["input_ids"])


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """A conversation (and the tools the model may call, OpenAI's {"type": "function",
    "function": {...}} entries) through the model's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no tokenizer with a chat template")
    return as_ids(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                add_generation_prompt=add_generation_prompt))


def as_ids(encoded) -> list[int]:
    """What a tokenizer call returns (a BatchEncoding, a tensor, a list or a list of one list)
    -> a flat list of ids."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)
