"""Every bad configuration fails before any rank starts, naming the number or path at fault."""
import json
import multiprocessing
import re
import shutil

import pytest
import torch

from seqpar import LLM, SamplingParams


def variant(tiny, tmp_path, family, **changes):
    """A copy of a tiny checkpoint with config.json fields changed."""
    out = tmp_path / f"{family}-variant"
    shutil.copytree(tiny(family), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def fails_before_start(match, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        LLM(threads_per_rank=1, **kwargs)
    assert multiprocessing.active_children() == [], "a rank was started for a bad configuration"


def test_tp_must_divide_heads(tiny):
    # 6 heads, tp=4
    fails_before_start(r"num_attention_heads: 6 is not divisible by 4",
                       model=str(tiny("llama-mqa-tied")), tensor_parallel_size=4)


def test_tp_must_divide_intermediate(tiny, tmp_path):
    fails_before_start(r"intermediate_size: 98 is not divisible by 3",
                       model=variant(tiny, tmp_path, "mistral", intermediate_size=98),
                       tensor_parallel_size=3)


def test_tp_and_kv_heads_must_divide_one_another(tiny):
    # 12 heads and 96 MLP columns divide by 4, the 6 KV heads neither divide 4 nor are divided by it.
    fails_before_start(r"num_key_value_heads=6 must be divisible by it",
                       model=str(tiny("llama-gqa")), tensor_parallel_size=4)


def test_unknown_model_type(tiny, tmp_path):
    fails_before_start(r"model_type 'gpt2' is not supported; seqpar runs llama, mistral, qwen2, qwen3",
                       model=variant(tiny, tmp_path, "mistral", model_type="gpt2"))


def test_missing_path():
    fails_before_start(r"/no/such/model", model="/no/such/model")


def test_missing_config(tiny, tmp_path):
    broken = tmp_path / "no-config"
    shutil.copytree(tiny("qwen2"), broken)
    (broken / "config.json").unlink()
    fails_before_start(r"config\.json", model=str(broken))


def test_missing_weights(tiny, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny("qwen2"), broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    fails_before_start(r"safetensors", model=str(broken))


def damaged_weights(tiny, tmp_path, damage) -> tuple:
    """A copy of a tiny checkpoint whose safetensors file went through damage(bytes) -> bytes."""
    broken = tmp_path / "damaged-weights"
    shutil.copytree(tiny("qwen2"), broken)
    (file,) = broken.glob("*.safetensors")
    file.write_bytes(damage(file.read_bytes()))
    return broken, file


@pytest.mark.parametrize("damage", [
    lambda b: b[:len(b) // 2],    # truncated in the tensor data
    lambda b: b[:20],             # truncated in the header
    lambda b: b"\xff" * len(b),   # garbage
], ids=["truncated-data", "truncated-header", "garbage"])
def test_corrupt_safetensors_names_the_file(tiny, tmp_path, damage):
    from seqpar.loader.resolve import resolve_model

    broken, file = damaged_weights(tiny, tmp_path, damage)
    message = rf"{re.escape(str(file))}: not a readable safetensors file"
    with pytest.raises(ValueError, match=message):
        resolve_model(broken)  # what LLM() does first: before any rank starts
    fails_before_start(message, model=str(broken), tensor_parallel_size=2)


def test_load_weights_names_a_corrupt_file(tiny, tmp_path):
    """The ranks' own read: a file that went bad after the start-up check."""
    from seqpar.config import ModelConfig
    from seqpar.distributed.comm import Comm
    from seqpar.models import MODELS

    broken, file = damaged_weights(tiny, tmp_path, lambda b: b[:len(b) - 8])
    cfg = ModelConfig.from_dir(broken)
    model = MODELS[cfg.model_type](cfg, Comm(None, 0, 1), torch.float32, 64)
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: not a readable safetensors"):
        model.load_weights(broken)


def test_malformed_config(tiny, tmp_path):
    broken = tmp_path / "bad-json"
    shutil.copytree(tiny("qwen2"), broken)
    (broken / "config.json").write_text("{not json")
    fails_before_start(r"config\.json is not valid JSON", model=str(broken))


def test_bad_parallel_settings(tiny):
    model = str(tiny("qwen2"))
    fails_before_start(r"tensor_parallel_size must be a positive integer, got 0",
                       model=model, tensor_parallel_size=0)
    fails_before_start(r"sequence_parallel must be one of", model=model, sequence_parallel="yes")
    fails_before_start(r"max_model_len=999 exceeds the model's max_position_embeddings=256",
                       model=model, max_model_len=999)


def test_checkpoint_missing_a_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "missing-tensor"
    shutil.copytree(tiny("qwen2"), broken)
    (file,) = broken.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e.g. model.layers.1.mlp.gate_up_proj.weight \[1\]"):
        LLM(str(broken), threads_per_rank=1)


def test_prompt_longer_than_max_model_len(tiny):
    with LLM(str(tiny("qwen2")), max_model_len=8, threads_per_rank=1) as llm:
        with pytest.raises(ValueError, match=r"prompt 1 has 9 tokens, longer than max_model_len=8"):
            llm.generate([[5, 6], list(range(3, 12))], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match=r"prompt 0: token id 5000 is outside the vocab \(size 1003\)"):
            llm.generate([[5000]], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match=r"prompt 0 is empty"):
            llm.generate([[]], SamplingParams(max_tokens=2))
        # The engine is still usable after rejected requests.
        assert len(llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_sampling_params_are_checked():
    for bad, match in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                       (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_checkpoint_shape_disagrees_with_config(tiny, tmp_path):
    # 98 divides by 2, so this passes the parallel checks; the weights are [96, 48].
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight: shape \[(96, 48|48, 96)\] in "
                                         r"the checkpoint, \[(98, 48|48, 98)\] expected"):
        LLM(variant(tiny, tmp_path, "mistral", intermediate_size=98), threads_per_rank=1)
