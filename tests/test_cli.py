"""The command line on a tiny model: generate with stats, check, and clear errors."""
from seqpar.cli import main


def test_generate_without_tokenizer_says_so(tiny, capsys):
    # The tiny checkpoints have no tokenizer files: a text prompt is refused with the reason.
    rc = main(["generate", "--model", str(tiny("qwen2")), "-tp", "2", "hello"])
    assert rc == 2
    assert "has no tokenizer files; pass token ids instead" in capsys.readouterr().err


def test_check_prints_plan(tiny, capsys):
    assert main(["check", "--model", str(tiny("llama-mqa-tied")), "-tp", "3"]) == 0
    out = capsys.readouterr().out
    assert "each KV head replicated on 3 ranks" in out
    assert "vocab padded to 999" in out
    assert "sequence parallelism: supported by every module kind" in out


def test_check_rejects_bad_tp(tiny, capsys):
    assert main(["check", "--model", str(tiny("llama-mqa-tied")), "-tp", "4"]) == 2
    assert "num_attention_heads: 6 is not divisible by 4" in capsys.readouterr().err


def test_generate_reports_missing_model(capsys):
    assert main(["generate", "--model", "/nowhere/model"]) == 2
    assert "/nowhere/model" in capsys.readouterr().err
