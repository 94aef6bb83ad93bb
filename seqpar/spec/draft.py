"""Draft-model proposals: a small model of the target's vocabulary, unsharded (a world-size-1
Comm) in rank 0's process, with its own paged KV cache and block manager.

Per proposal round every sequence first catches the draft's cache up with the tokens it has not
seen (its prompt the first time; after a verification, the accepted tokens and the correction),
which yields its first draft; then k - 1 one-token steps yield the rest, all sequences batched in
each step, no forward longer than the target's max_num_batched_tokens (a long catch-up is
chunked). The draft's cache keeps the tokens it fed; the next round keeps of them the prefix the
target accepted and rolls the rest back (BlockManager.truncate), so a rejected draft's KV is never
read. When its pool is full the draft drops the cache of the sequence it used least recently
(recomputed if that sequence proposes again), and a sequence that still finds no room proposes
nothing that round: the draft never holds up the target.

Greedy requests take the draft's argmax; sampled ones draw from the draft's distribution at the
request's temperature with a generator of their own, and `probs` returns that distribution q per
draft (a point mass for greedy ones) for rejection sampling (Sampler.verify); None when every
draft was greedy (verification then reads no q: no [k, V] rows built for nothing).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from seqpar.config import EngineConfig, ModelConfig, ParallelConfig, round_up
from seqpar.distributed.comm import Comm
from seqpar.engine.block_manager import BlockManager
from seqpar.engine.sequence import Sequence
from seqpar.loader.resolve import gguf_source, resolve_model
from seqpar.models import MODELS
from seqpar.worker.memory import allocate_kv_pool
from seqpar.worker.plan import StepPlan

DRAFT_SEED_SALT = 0x5EED_D4AF
"""Mixed into a request's seed for its draft generator: the draft draws its own random numbers,
never the target sampler's."""


@dataclass
class DraftRequest:
    """One sequence asking for proposals."""

    key: int
    token_ids: list[int]
    """Its prompt and output so far (read, never changed)."""
    temperature: float
    seed: int
    limit: int
    """The most tokens to propose (k, or fewer near max_tokens / max_model_len)."""


class DraftProposer:
    def __init__(self, model: str | Path, num_speculative_tokens: int, target: EngineConfig,
                 device: torch.device | str = "cpu"):
        """model: the draft's HF directory, .gguf file or alias. It runs in the target's dtype,
        its weights in the format quantization "auto" picks for it (a quantized GGUF draft keeps
        its types where the kernels are fast, as a target would)."""
        self.k = num_speculative_tokens
        self.max_tokens = target.max_num_batched_tokens
        """Tokens per draft forward, as the target's steps."""
        self.max_model_len = target.max_model_len
        self.device = torch.device(device)
        model_dir = resolve_model(model)
        bs = target.block_size
        # The target's pool holds every running sequence's context; the draft's holds the same
        # plus, per sequence, its k - 1 fed drafts and a partly filled block.
        num_blocks = target.num_blocks + target.max_num_seqs * (round_up(self.k, bs) // bs + 1)
        cfg = EngineConfig(model_dir, ModelConfig.from_dir(model_dir), ParallelConfig(),
                           target.dtype, target.max_model_len, target.max_num_seqs,
                           device=target.device, block_size=bs, compile=False,
                           quantization="auto", gguf_file=gguf_source(model),
                           num_blocks=num_blocks)
        self.cfg, self.dtype = cfg.model, cfg.torch_dtype
        with torch.device(self.device):
            self.model = MODELS[self.cfg.model_type](self.cfg, Comm(None, 0, 1), self.dtype,
                                                     self.max_model_len)
        self.model.load_weights(model_dir, cfg.quantization, cfg.gguf_file)
        self.model.eval()
        self.blocks = BlockManager(cfg.num_blocks, bs, enable_prefix_caching=False)
        self.kv_pool = allocate_kv_pool(self.model, cfg.num_blocks, bs, self.dtype, self.device)
        self.states: OrderedDict[int, Sequence] = OrderedDict()
        """Per request key, the draft's view: token_ids = what its cache holds (computed) and the
        last draft; least recently used first."""
        self.known: dict[int, int] = {}
        """Per key: the target's token count at its last proposal (those tokens are final)."""
        self.generators: dict[int, torch.Generator] = {}

    def remove(self, key: int) -> None:
        """The request ended (or will not propose again): free its draft cache."""
        state = self.states.pop(key, None)
        if state is not None:
            self.blocks.release(state)
        self.known.pop(key, None)
        self.generators.pop(key, None)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]
                ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Per request up to `limit` draft tokens, and q [len(drafts), V] float32: the
        distribution each draft was drawn from (None when every draft was greedy)."""
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        feeds: dict[int, list[int]] = {}  # request index -> tokens to feed before its next draft
        # A draft is fed at the position after the one before it: the last must stay below
        # max_model_len, the draft's rotary table.
        limits = [min(r.limit, self.max_model_len + 1 - len(r.token_ids)) for r in requests]
        keys = {r.key for r in requests}
        for i, (req, limit) in enumerate(zip(requests, limits)):
            if limit <= 0:
                continue
            state, start = self._catch_up(req)
            need = len(req.token_ids) - start + limit - 1  # context to feed + fed drafts
            if self._make_room(state, need, keep=keys):
                self.blocks.allocate(state, need)
                feeds[i] = req.token_ids[start:]
        step = 0
        while feeds:
            for i, (token, q) in self._run(requests, feeds).items():
                drafts[i].append(token)
                probs[i].append(q)
            step += 1
            feeds = {i: [drafts[i][-1]] for i in feeds if limits[i] > step}
        if all(q is None for qs in probs for q in qs):
            return drafts, None
        vocab = self.cfg.vocab_size
        return drafts, [torch.stack(qs) if qs and qs[0] is not None else
                        F.one_hot(torch.tensor(d, dtype=torch.int64), vocab).float()
                        for d, qs in zip(drafts, probs)]

    def _run(self, requests: list[DraftRequest], feeds: dict[int, list[int]]
             ) -> dict[int, tuple[int, torch.Tensor | None]]:
        """Feed each request's tokens into the draft's cache, in forwards of at most
        max_num_batched_tokens tokens (a long catch-up is chunked), and draw one draft per
        request after its last token: {request index: (draft, q [V])}."""
        pending, out = dict(feeds), {}
        while pending:
            batch, budget = [], self.max_tokens
            for i, tokens in pending.items():
                if budget == 0:
                    break
                batch.append((i, tokens[:budget]))
                budget -= len(batch[-1][1])
            states = [self.states[requests[i].key] for i, _ in batch]
            done = [len(chunk) == len(pending[i]) for i, chunk in batch]
            logits = self.model(self._plan(states, [c for _, c in batch], done))  # [S, V]
            rows = iter(logits)
            for (i, chunk), state, last in zip(batch, states, done):
                state.computed += len(chunk)
                state.scheduled = state.computed
                if last:
                    token, q = self._draw(requests[i], next(rows))
                    state.token_ids.append(token)
                    out[i] = token, q
                    del pending[i]
                else:
                    pending[i] = pending[i][len(chunk):]
        return out

    def _catch_up(self, req: DraftRequest) -> tuple[Sequence, int]:
        """The request's draft state with its cache rolled back to the prefix of req.token_ids it
        holds (at most all but the last token: a round feeds at least one); returns (state,
        tokens in its cache)."""
        state = self.states.pop(req.key, None)
        if state is None:
            state = Sequence(str(req.key), req.key, [], None, req.seed)
        self.states[req.key] = state  # most recently used last
        ids, known = req.token_ids, min(self.known.get(req.key, 0), state.computed)
        keep = known
        while keep < state.computed and keep < len(ids) and state.token_ids[keep] == ids[keep]:
            keep += 1  # a fed draft the target accepted
        keep = min(keep, len(ids) - 1)
        self.blocks.truncate(state, keep)
        del state.token_ids[keep:]
        state.token_ids.extend(ids[keep:])
        self.known[req.key] = len(ids)
        return state, keep

    def _make_room(self, state: Sequence, tokens: int, keep: set[int]) -> bool:
        """Free draft blocks for `tokens` more of `state`'s, dropping the caches of the least
        recently used sequences outside this round; False when there is still no room."""
        need = self.blocks.blocks_needed(state, tokens)
        for key in [k for k in self.states if k not in keep]:
            if self.blocks.can_allocate(need):
                break
            self.remove(key)
        return self.blocks.can_allocate(need)

    def _plan(self, states: list[Sequence], chunks: list[list[int]], sample: list[bool]
              ) -> StepPlan:
        """A TP step of the world-size-1 draft: each state's chunk after its cache, the last
        row of the sequences in `sample` sampled."""
        ids = [t for chunk in chunks for t in chunk]
        return StepPlan(False, torch.tensor(ids, dtype=torch.int64, device=self.device),
                        [s.computed for s in states], [len(c) for c in chunks], sample,
                        [list(s.block_table) for s in states], 1, self.blocks.block_size)

    def _draw(self, req: DraftRequest, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(draft token, q [V]): the argmax (q None: a point mass on it) for greedy requests;
        for sampled ones a draw from q = softmax(logits / temperature) with the request's draft
        generator."""
        if req.temperature == 0:
            return int(logits.argmax()), None
        gen = self.generators.get(req.key)
        if gen is None:
            gen = self.generators[req.key] = torch.Generator(logits.device).manual_seed(
                req.seed ^ DRAFT_SEED_SALT)
        q = torch.softmax(logits / req.temperature, dim=-1)
        return int(torch.multinomial(q, 1, generator=gen)), q
