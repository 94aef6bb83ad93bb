"""What the bench measures: seqpar, HF transformers on one process, PyTorch DTensor TP+SP.

Each subject answers the same questions, inside its own process (see hosts.py):
    prefill(ids, variant)               -> seconds for one forward of len(ids) tokens + 1 sampled row
    generate(prompts, n, variant)       -> seconds to generate n tokens per prompt (greedy, no EOS)
    memory(ids, variant)                -> peak activation bytes of that prefill on this rank
    comm(prompts, n, variant)           -> communication counters of that call (seqpar only)
    collectives(ops)                    -> (wall s, CPU s) of those collectives alone (seqpar only)
`variant` is the mode's setting inside a subject shared by several modes (seqpar's SP mode).
"""
from __future__ import annotations

import time

import torch

from seqpar.worker.memory import PeakMemory


class SeqparSubject:
    """One seqpar LLM; its SP modes switch per call (layers read each step's mode from the plan)."""

    def __init__(self, rank: int, world: int, model_dir: str, tp: int, threads_per_rank: int,
                 max_model_len: int, dtype: str, llm_kwargs: dict):
        from seqpar import LLM
        # The bench runs the same prompts round after round: without the prefix cache, or every
        # round after the first would time a cache hit instead of the prefill.
        self.llm = LLM(model_dir, tensor_parallel_size=tp,
                       sequence_parallel="auto" if tp > 1 else "off", dtype=dtype,
                       max_model_len=max_model_len, threads_per_rank=threads_per_rank,
                       enable_prefix_caching=False, **llm_kwargs)
        self.sp_allowed = tp > 1 and self.llm.policy.mode != "off"
        """False where LLM turned SP off for this model (a module kind without an SP role)."""

    def info(self) -> dict:
        """The measured SP threshold in tokens (None when not measured)."""
        return {"threshold": self.llm.policy.threshold}

    def _set(self, variant: dict | None) -> None:
        """Set the coming calls' steps: {"mode": "off" | "on" | "auto", "overlap": bool,
        "in_flight": steps in flight with a pipeline (default: one per stage)}, through the LLM's
        public policy and engine. A model that runs without SP (LLM said why at start-up) refuses
        every mode but "off"."""
        if variant is None:
            return
        unknown = set(variant) - {"mode", "overlap", "in_flight"}
        if unknown:
            raise ValueError(f"unknown seqpar mode settings {sorted(unknown)}")
        mode = variant.get("mode", "auto")
        if mode != "off" and not self.sp_allowed:
            raise ValueError(f"mode {mode!r}: this model runs without sequence parallelism")
        policy = self.llm.policy
        policy.mode, policy.overlap = mode, variant.get("overlap", False)
        self.llm.engine.max_in_flight = variant.get(
            "in_flight", self.llm.cfg.parallel.pipeline_parallel_size)

    def _params(self, n: int):
        from seqpar import SamplingParams
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def prefill(self, ids: list[int], variant: dict | None) -> float:
        return self.generate([ids], 1, variant)

    def generate(self, prompts: list[list[int]], n: int, variant: dict | None) -> float:
        self._set(variant)
        params = self._params(n)
        t0 = time.perf_counter()
        self.llm.generate(prompts, params)
        return time.perf_counter() - t0

    def memory(self, ids: list[int], variant: dict | None) -> tuple[list[int], dict]:
        """(every rank's peak activation bytes, the communication counters) of one prefill."""
        self._set(variant)
        self.llm.reset_comm_stats()
        peaks = self.llm.profile_memory([ids], self._params(1))
        return peaks, self.llm.comm_stats()

    def comm(self, prompts: list[list[int]], n: int, variant: dict | None) -> dict:
        self._set(variant)
        self.llm.reset_comm_stats()
        self.llm.generate(prompts, self._params(n))
        return self.llm.comm_stats()

    def compile_s(self) -> float:
        """Seconds rank 0 spent compiling so far (compile=True; else 0.0)."""
        return self.llm.compile_s

    def collectives(self, ops: list[tuple[str, int, int]]) -> tuple[float, float]:
        return self.llm.time_collectives(ops)

    def close(self) -> None:
        self.llm.close()


def _load_hf(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    return model


class HFSubject:
    """HF transformers' LlamaForCausalLM in one process (its default attention, SDPA)."""

    def __init__(self, rank: int, world: int, model_dir: str, dtype: str):
        self.model = _load_hf(model_dir, dtype)

    def info(self) -> dict:
        return {"attn_implementation": self.model.config._attn_implementation}

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> int:
        # logits_to_keep=1: the logits of the sampled row only, as an engine computes them.
        logits = self.model(torch.tensor([ids]), logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    def prefill(self, ids: list[int], variant=None) -> float:
        t0 = time.perf_counter()
        self._forward(ids)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int, variant=None) -> float:
        ids = torch.tensor(prompts)  # equal lengths: no padding
        t0 = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    def memory(self, ids: list[int], variant=None) -> int:
        with PeakMemory("cpu") as mem:
            self._forward(ids)
        return mem.peak

    def close(self) -> None:
        pass


def dtensor_plan(model, mesh) -> None:
    """PyTorch's TP tutorial plan (Colwise / Rowwise / SequenceParallel / PrepareModuleInput) on HF
    Llama, with the residual stream kept a DTensor sharded along the sequence: HF then derives
    positions and the causal mask from the global length, and uneven lengths work (facts in
    docs/architecture.md, "Facts the code relies on")."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    tied = model.config.tie_word_embeddings
    parallelize_module(model, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                              use_local_output=False),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {
            "input_layernorm": SequenceParallel(),
            # HF calls self_attn(hidden_states=...) by keyword, the MLP positionally.
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                            use_local_output=True),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })
    if tied:  # parallelize_module replaced both parameters; both are Shard(0) of the same matrix
        model.lm_head.weight = model.model.embed_tokens.weight


class DTensorSubject(HFSubject):
    """The same HF model, parallelized by torch.distributed.tensor.parallel over `world` ranks."""

    def __init__(self, rank: int, world: int, model_dir: str, dtype: str):
        from torch.distributed.device_mesh import init_device_mesh
        self.model = _load_hf(model_dir, dtype)
        cfg = self.model.config
        for what, n in (("num_attention_heads", cfg.num_attention_heads),
                        ("num_key_value_heads", cfg.num_key_value_heads)):
            if n % world:
                raise ValueError(f"DTensor TP: {what}={n} is not divisible by tp={world}")
        self.mesh = init_device_mesh("cpu", (world,))
        dtensor_plan(self.model, self.mesh)

    def info(self) -> dict:
        return {"attn_implementation": self.model.config._attn_implementation}

    def _barrier(self) -> None:
        torch.distributed.barrier()

    def prefill(self, ids: list[int], variant=None) -> float:
        self._barrier()  # every rank starts together; rank 0's time is the answer
        return super().prefill(ids)

    def generate(self, prompts: list[list[int]], n: int, variant=None) -> float:
        self._barrier()
        return super().generate(prompts, n)
