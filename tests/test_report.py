"""The SP support report: every module kind of the supported models is declared; an undeclared one
in the model blocks SP (the model then runs TP and says so)."""
import torch
import torch.nn as nn

from seqpar import LLM, SamplingParams
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
    """In place of a decoder layer's MLP: a token-mixing op in the residual stream, where SP (each
    rank holding T/N tokens) would be wrong. Counts its calls, to show the forward runs it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, plan):
        self.calls += 1
        return x.cumsum(0)


def test_undeclared_module_in_the_forward_blocks_sp(tiny):
    # tp=1: rank 0's model lives in this process, so the test can swap a layer's MLP for the mix.
    with LLM(str(tiny("llama-gqa")), threads_per_rank=1) as llm:
        mix = llm.worker.runner.model.model.layers[1].mlp = CumulativeMix()
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, temperature=0))
        assert mix.calls == 1, "the test's token-mixing module must sit on the forward path"
        assert sp_blockers(llm.worker.runner.model) == [
            "CumulativeMix: not declared token-wise, so SP would be unsafe"]


def test_report_names_each_kind(tiny):
    text = support_report(str(tiny("qwen2")), tensor_parallel_size=2)
    for kind in ("VocabParallelEmbedding", "RMSNorm", "QKVParallelLinear", "RowParallelLinear",
                 "Attention", "ParallelLMHead"):
        assert kind in text
    assert "mixes tokens: runs on the gathered T real tokens" in text
