"""The batch as every rank holds it: the requests running, their tokens, block tables and progress,
kept from step to step and changed only by rank 0's deltas (worker/plan.py has the format).

Each held request owns one row of a block-table buffer allocated once ([max_num_seqs, max blocks
per sequence] int32); new block ids are written into its row in place, and a step's tables are its
sequences' rows picked in row order (one index_select). Positions, slots and the other index
tensors come from a few vectorized ops over the step's starts and lengths (layers/attention.py
metadata_from), not from per-sequence Python lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.layers.attention import AttentionMetadata, metadata_from
from seqpar.worker.plan import ChecksumMismatch, StepDelta, StepPlan, batch_checksum


@dataclass
class HeldRequest:
    row: int
    """Its row of the block-table buffer."""
    token_ids: list[int]
    """Every token id rank 0 has sent: the prompt, then decoded (or draft) tokens."""
    num_prompt_tokens: int
    block_ids: list[int]
    """Its blocks, as in its block-table row (decode steps compute their slots from this)."""
    computed: int
    """Tokens handed to steps so far (in the KV cache once those steps ran)."""
    params: object
    """Its SamplingParams."""


class BatchState:
    def __init__(self, max_seqs: int, max_blocks: int, block_size: int, world_size: int, device):
        self.block_size, self.world_size, self.device = block_size, world_size, device
        self.block_table = torch.zeros(max_seqs, max_blocks, dtype=torch.int32)
        """[max_num_seqs, max_blocks] int32 on the host: row r = the blocks of the request
        holding it; entries past its num_blocks are stale."""
        self.requests: dict[int, HeldRequest] = {}
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self.step = 0
        """The next delta's expected step number."""

    def apply(self, delta: StepDelta) -> StepPlan:
        """Apply one step's delta and return the step to run. ChecksumMismatch when the delta
        does not fit this state (a delta missed or misapplied): the rank stops rather than drift
        from the others."""
        if delta.step != self.step:
            raise ChecksumMismatch(f"step message {delta.step} arrived where {self.step} was "
                                   "expected: a step was missed")
        self.step += 1
        for key, keep in delta.rollback:  # before the drops: a request may end right after
            held = self.requests.get(key)
            if held is None or not keep <= held.computed:
                raise ChecksumMismatch(f"step {delta.step} rolls request {key} back to {keep} "
                                       "tokens, more than this rank computed (or not held here)")
            del held.token_ids[keep:]
            del held.block_ids[-(-keep // self.block_size):]
            held.computed = keep
        for key in delta.dropped:
            held = self.requests.pop(key, None)
            if held is None:
                raise ChecksumMismatch(f"step {delta.step} drops request {key}, not held here")
            self._free_rows.append(held.row)
        for r in delta.new:
            if r.key in self.requests:
                raise ChecksumMismatch(f"step {delta.step} adds request {r.key}, already held")
            if not self._free_rows or len(r.block_ids) > self.block_table.shape[1]:
                raise RuntimeError(f"request {r.key}: the batch holds {self.block_table.shape[0]} "
                                   f"requests of {self.block_table.shape[1]} blocks at most")
            row = self._free_rows.pop()
            self.block_table[row, :len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
            self.requests[r.key] = HeldRequest(row, r.token_ids, r.num_prompt_tokens,
                                               list(r.block_ids), r.computed, r.params)
        bs = self.block_size
        ids, starts, rows, draws, ends = [], [], [], [], []
        slots = []  # per one-token sequence: its token's cache slot (a decode step's metadata)
        for key, n, m, blocks, tokens in zip(delta.keys, delta.num_tokens, delta.num_logit_rows,
                                             delta.new_blocks, delta.new_tokens):
            held = self.requests.get(key)
            if held is None:
                raise ChecksumMismatch(f"step {delta.step} runs request {key}, not held here")
            if blocks:
                have = len(held.block_ids)
                if have + len(blocks) > self.block_table.shape[1]:
                    raise RuntimeError(f"request {key} needs more than "
                                       f"{self.block_table.shape[1]} blocks")
                self.block_table[held.row, have:have + len(blocks)] = torch.tensor(
                    blocks, dtype=torch.int32)
                held.block_ids += blocks
            held.token_ids += tokens
            start, end = held.computed, held.computed + n
            if n < 1 or end > len(held.token_ids) or end > len(held.block_ids) * self.block_size:
                raise ChecksumMismatch(
                    f"step {delta.step}: request {key} runs tokens [{start}, {end}) but this rank "
                    f"has {len(held.token_ids)} token ids and {len(held.block_ids)} blocks")
            ids += held.token_ids[start:end]
            if n == 1:
                slots.append(held.block_ids[start // bs] * bs + start % bs)
            starts.append(start)
            ends.append(end)
            rows.append(held.row)
            draws.append(end == len(held.token_ids))
            held.computed = end
        mine = batch_checksum({k: h.computed for k, h in self.requests.items()})
        if mine != delta.checksum:
            raise ChecksumMismatch(f"step {delta.step}: this rank's batch state (checksum {mine}) "
                                   f"differs from rank 0's ({delta.checksum}): a delta was missed "
                                   "or misapplied")
        if not rows:
            raise ValueError(f"step {delta.step} schedules no request")
        width = -(-max(ends) // self.block_size)
        tables = self.block_table[torch.tensor(rows), :width]  # [B, width] in row order
        if len(slots) == len(rows):  # every sequence decodes one token
            meta, positions = self._decode_metadata(slots, starts, ends, tables)
        else:
            decodes = next(b for b, n in enumerate(delta.num_tokens) if n != 1)
            meta, positions = metadata_from(torch.tensor(starts), torch.tensor(delta.num_tokens),
                                            tables, self.block_size, max(delta.num_tokens),
                                            max(ends), decodes, self.device)
        plan = StepPlan(delta.sp, torch.tensor(ids, device=self.device), starts,
                        delta.num_tokens, delta.num_logit_rows, None, self.world_size,
                        self.block_size, delta.sp and delta.overlap, delta.keys, draws,
                        delta.num_drafts, delta.draft_probs)
        return plan.with_metadata(positions, meta)

    def _decode_metadata(self, slots: list[int], starts: list[int], ends: list[int],
                         tables: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
        """A step of one token per sequence: positions are the starts and each slot one lookup
        in the request's block list, made on the host as apply goes (cheaper than
        metadata_from's tensor ops for the B rows of a decode step)."""
        dev = self.device
        b = len(slots)
        meta = AttentionMetadata(torch.tensor(slots, device=dev),
                                 torch.arange(b + 1, dtype=torch.int32, device=dev),
                                 torch.tensor(ends, dtype=torch.int32, device=dev),
                                 tables.to(dev), 1, max(ends), b)
        return meta, torch.tensor(starts, device=dev)
