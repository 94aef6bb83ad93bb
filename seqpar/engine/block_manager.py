"""The paged KV cache's bookkeeping, on rank 0: which blocks each sequence holds, and the prefix cache.

Every rank has the same pools (num_blocks blocks of block_size tokens per layer); only rank 0 decides
which block holds what; each block id reaches the ranks once, in the step that first uses it
(worker/plan.py).

Prefix caching: a full block is keyed by hash(parent block's key, its token ids), so a key names the
whole prefix up to the block's end. A request whose prompt starts with cached blocks takes them
(reference-counted, shared read-only: only full blocks are shared, and a sequence writes past its
last full block) and computes only the rest. A freed block keeps its key and content until it is
handed out again; free blocks are handed out least recently freed first, never-filled ones before
cached ones, so the cache evicts in LRU order.
"""
from __future__ import annotations

from collections import OrderedDict

from seqpar.config import round_up
from seqpar.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.caching = enable_prefix_caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """Blocks no sequence holds, the next one to hand out first."""
        self.keys: list[int | None] = [None] * num_blocks
        """Per block: its prefix key while it holds a full, hashed block."""
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        """Per hashed block: its token ids (checked on a hit: a key collision is no hit)."""
        self.cached: dict[int, int] = {}
        """Prefix key -> the block holding it."""
        self.queries = 0
        """Prompt tokens looked up in the prefix cache (every admission)."""
        self.hits = 0
        """Of those, tokens served from cached blocks."""

    @property
    def used(self) -> int:
        """Blocks held by unfinished sequences."""
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, tokens: int) -> int:
        """New blocks `seq` needs to hold `tokens` more tokens beyond those handed to steps."""
        bs = self.block_size
        return max(0, round_up(seq.scheduled + tokens, bs) // bs - len(seq.block_table))

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= len(self.free)

    def allocate(self, seq: Sequence, tokens: int) -> None:
        """Grow `seq`'s block table to hold `tokens` more tokens (the caller checked there is room)."""
        for _ in range(self.blocks_needed(seq, tokens)):
            block, _ = self.free.popitem(last=False)
            key = self.keys[block]
            if key is not None:  # evict: the block is about to hold something else
                if self.cached.get(key) == block:
                    del self.cached[key]
                self.keys[block] = self.tokens[block] = None
            self.refs[block] = 1
            seq.block_table.append(block)

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix of full blocks. The last token is
        never taken from the cache: its logits are needed."""
        if not self.caching:
            return []
        ids, bs, key, blocks = seq.token_ids, self.block_size, None, []
        for i in range((len(ids) - 1) // bs):
            tokens = tuple(ids[i * bs:(i + 1) * bs])
            key = hash((key, tokens))
            block = self.cached.get(key)
            if block is None or self.tokens[block] != tokens:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, cached: list[int], tokens: int) -> bool:
        """Whether a sequence that takes the `cached` blocks can also get blocks for `tokens` more
        (cached blocks no one holds leave the free list too)."""
        bs = self.block_size
        new = round_up(len(cached) * bs + tokens, bs) // bs - len(cached)
        return self.can_allocate(new + sum(self.refs[b] == 0 for b in cached))

    def admit(self, seq: Sequence, cached: list[int]) -> int:
        """Give a sequence that holds no blocks its `cached` prefix blocks (from match); return the
        tokens they cover. Counts the prompt as looked up and the covered tokens as hits."""
        for block in cached:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        seq.block_table = list(cached)
        seq.num_hashed = len(cached)
        seq.hashed_key = self.keys[cached[-1]] if cached else None
        self.queries += seq.num_tokens
        self.hits += len(cached) * self.block_size
        return len(cached) * self.block_size

    def register(self, seq: Sequence) -> None:
        """Key the blocks `seq` has filled since the last call (its computed tokens), so later
        prompts can reuse them."""
        if not self.caching:
            return
        bs, ids = self.block_size, seq.token_ids
        while seq.num_hashed < seq.computed // bs:
            i = seq.num_hashed
            block, tokens = seq.block_table[i], tuple(ids[i * bs:(i + 1) * bs])
            seq.hashed_key = hash((seq.hashed_key, tokens))
            # Two sequences that computed the same prefix side by side: the first one keeps the key.
            if seq.hashed_key not in self.cached:
                self.cached[seq.hashed_key] = block
                self.keys[block], self.tokens[block] = seq.hashed_key, tokens
            seq.num_hashed += 1

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep the KV of `seq`'s first `num_tokens` tokens and drop the rest: its computed and
        scheduled counts become num_tokens and the blocks past them go back to the free list
        (first in line: a block past the keyed ones holds no key, and no one shares it). A
        dropped token's slot in a kept block is overwritten before any step reads it (attention
        reads a sequence's slots below its length only)."""
        bs = self.block_size
        if not seq.num_hashed * bs <= num_tokens <= seq.scheduled:
            raise ValueError(f"truncate {seq.request_id} to {num_tokens} tokens: it has "
                             f"{seq.scheduled} scheduled and {seq.num_hashed} keyed blocks of {bs}")
        seq.computed = seq.scheduled = num_tokens
        keep = round_up(num_tokens, bs) // bs
        for block in reversed(seq.block_table[keep:]):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)
        del seq.block_table[keep:]

    def rollback(self, seq: Sequence, num_computed: int) -> None:
        """After a speculative verification step: `seq` keeps the KV of its first `num_computed`
        tokens (its context, the step's first token and the accepted drafts) and drops the
        rejected drafts' (truncate); the full blocks of accepted tokens are keyed for the prefix
        cache, so seq.token_ids must already hold the accepted tokens."""
        if not seq.computed <= num_computed <= min(seq.scheduled, seq.num_tokens):
            raise ValueError(f"rollback of {seq.request_id} to {num_computed} tokens: it has "
                             f"{seq.computed} computed, {seq.scheduled} scheduled and "
                             f"{seq.num_tokens} known tokens (append the accepted ones first)")
        self.truncate(seq, num_computed)
        self.register(seq)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks. A block no one holds becomes free: never-keyed blocks go to the
        front of the line to be handed out, keyed ones to the back (the tail of a sequence first,
        so a prefix outlives its continuations)."""
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.keys[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_hashed, seq.hashed_key = 0, None
