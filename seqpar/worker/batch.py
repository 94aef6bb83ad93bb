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

from seqpar.layers.attention import metadata_from
from seqpar.worker.plan import ChecksumMismatch, StepDelta, StepPlan, batch_checksum


@dataclass
class HeldRequest:
    row: int
    """Its row of the block-table buffer."""
    token_ids: list[int]
    """Every token id rank 0 has sent: the prompt, then decoded (or draft) tokens."""
    num_prompt_tokens: int
    num_blocks: int
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
                                               len(r.block_ids), r.computed, r.params)
        ids, starts, rows, draws, ends = [], [], [], [], []
        for key, n, m, blocks, tokens in zip(delta.keys, delta.num_tokens, delta.num_logit_rows,
                                             delta.new_blocks, delta.new_tokens):
            held = self.requests.get(key)
            if held is None:
                raise ChecksumMismatch(f"step {delta.step} runs request {key}, not held here")
            if blocks:
                if held.num_blocks + len(blocks) > self.block_table.shape[1]:
                    raise RuntimeError(f"request {key} needs more than "
                                       f"{self.block_table.shape[1]} blocks")
                self.block_table[held.row, held.num_blocks:held.num_blocks + len(blocks)] = (
                    torch.tensor(blocks, dtype=torch.int32))
                held.num_blocks += len(blocks)
            held.token_ids += tokens
            start, end = held.computed, held.computed + n
            if n < 1 or end > len(held.token_ids) or end > held.num_blocks * self.block_size:
                raise ChecksumMismatch(
                    f"step {delta.step}: request {key} runs tokens [{start}, {end}) but this rank "
                    f"has {len(held.token_ids)} token ids and {held.num_blocks} blocks")
            ids += held.token_ids[start:end]
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
        lens = torch.tensor(delta.num_tokens)
        width = -(-max(ends) // self.block_size)
        tables = self.block_table[torch.tensor(rows), :width]  # [B, width] in row order
        decodes = next((b for b, n in enumerate(delta.num_tokens) if n != 1), len(rows))
        meta, positions = metadata_from(torch.tensor(starts), lens, tables, self.block_size,
                                        max(delta.num_tokens), max(ends), decodes, self.device)
        plan = StepPlan(delta.sp, torch.tensor(ids, device=self.device), starts,
                        delta.num_tokens, delta.num_logit_rows, None, self.world_size,
                        self.block_size, delta.sp and delta.overlap, delta.keys, draws)
        return plan.with_metadata(positions, meta)
