"""seqpar: tensor- and sequence-parallel inference for Llama-family models."""
import logging

from seqpar.engine.llm import LLM
from seqpar.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]

# A library says what it does through logging and leaves the handlers to the application
# (`seqpar` the CLI installs one).
logging.getLogger("seqpar").addHandler(logging.NullHandler())
