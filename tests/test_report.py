"""The SP support report: every module kind of the supported models is declared; an undeclared one
in the model blocks SP (the model then runs TP and says so)."""
import torch
import torch.nn as nn

from seqpar.config import ModelConfig
from seqpar.distributed.comm import Comm
from seqpar.models import MODELS
from seqpar.report import sp_blockers, support_report


def meta_model(model_dir, tp=2):
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        return MODELS[cfg.model_type](cfg, Comm(None, 0, tp), torch.float32, 64)


def test_supported_families_have_no_blockers(tiny):
    for family in ("llama-gqa", "qwen3", "mistral"):
        assert sp_blockers(meta_model(tiny(family))) == []


class CumulativeMix(nn.Module):
    """A token-mixing op in the residual stream: SP would be wrong here."""

    def forward(self, x):
        return x.cumsum(0)


def test_undeclared_module_blocks_sp(tiny):
    model = meta_model(tiny("llama-gqa"))
    model.model.layers[1].mix = CumulativeMix()
    assert sp_blockers(model) == ["CumulativeMix: not declared token-wise, so SP would be unsafe"]


def test_report_names_each_kind(tiny):
    text = support_report(str(tiny("qwen2")), tensor_parallel_size=2)
    for kind in ("VocabParallelEmbedding", "RMSNorm", "QKVParallelLinear", "RowParallelLinear",
                 "Attention", "ParallelLMHead"):
        assert kind in text
    assert "mixes tokens: runs on the gathered T real tokens" in text
