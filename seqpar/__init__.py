"""seqpar: tensor- and sequence-parallel inference for Llama-family models."""
from seqpar.engine.llm import LLM
from seqpar.engine.sampler import SamplingParams

__all__ = ["LLM", "SamplingParams"]
