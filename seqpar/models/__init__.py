"""Model classes by HF model_type: the dense families are Llama variants chosen by config, the
mixture-of-experts families the same model with MoE blocks (models/moe.py)."""
from seqpar.models.llama import LlamaForCausalLM
from seqpar.models.moe import MoeForCausalLM

MODELS = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
          "qwen3": LlamaForCausalLM, "mixtral": MoeForCausalLM, "qwen2_moe": MoeForCausalLM,
          "qwen3_moe": MoeForCausalLM}
