"""Model classes by HF model_type. Every supported family is a Llama variant chosen by config."""
from seqpar.models.llama import LlamaForCausalLM

MODELS = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
          "qwen3": LlamaForCausalLM}
