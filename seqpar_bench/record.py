"""One measured point of `seqpar bench`: what suite.py writes and results.py / markdown.py read.

A record is one mode of one model at one tp (and pp): a prefill of `tokens` tokens, or a decode
of `batch` sequences (then `tokens` = batch). Fields that do not apply (HF has no communication
counters, one-stage modes no boundary bytes, ...) stay None and are left out of the JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Record:
    # ---- what ran
    scenario: str
    """"prefill" or "decode"."""
    model: str
    model_desc: str
    mode: str
    """The Mode's name (suite.MODES): "sp=off", "sp=on", "overlap", "hf", "pp=2", ..."""
    tp: int
    pp: int
    tokens: int
    """Prefill: the prompt's tokens; decode: the batch size."""
    threads: int
    """Torch threads of the whole mode (its ranks share them)."""
    runs: int

    # ---- time
    times_s: list[float]
    """Every measured run's seconds (decode: the decode steps only, the first token left out)."""
    median_s: float
    min_s: float
    max_s: float
    tokens_per_s: float
    ratio_vs_sp_off: float | None = None
    """This mode's time / sp=off's (prefill: median of run-by-run ratios; decode: of medians)."""
    ratio_vs_pp1: float | None = None
    """Pipeline modes: time / their one-stage twin's (Mode.versus)."""

    # ---- decode
    batch: int | None = None
    prompt_len: int | None = None
    new_tokens: int | None = None
    first_token_s: float | None = None
    """Median seconds of the 1-token generate (prefill + first token) the decode time excludes."""

    # ---- compile
    compile_s: float | None = None
    """Seconds the untimed first call spent compiling (compiled modes)."""
    compile_in_runs_s: float | None = None
    """Seconds of compiling inside the timed rounds (0.0 unless a step shape was new)."""

    # ---- memory (prefill)
    peak_bytes: list[int] | None = None
    """Every rank's peak activation bytes (the smallest over the memory runs)."""
    peak_bytes_predicted: dict | None = None
    """analytic.peak_activation for this step: {"total": bytes, ...}."""

    # ---- communication (seqpar)
    sp_step: bool | None = None
    """Whether the measured steps ran SP."""
    overlap_step: bool | None = None
    comm_bytes: float | None = None
    """Logical collective bytes per step (comm_stats())."""
    comm_min_bytes: int | None = None
    """analytic.comm_minimum for the step's mode."""
    comm_ratio: float | None = None
    comm: dict | None = None
    """comm_stats()'s {"calls", "bytes"} per collective used."""

    # ---- overlap (prefill, sp=on and overlap at tp > 1)
    comm_alone_s: float | None = None
    """Median wall seconds of the SP step's collectives run alone (LLM.time_collectives)."""
    comm_alone_times_s: list[float] | None = None
    comm_alone_cpu_s: float | None = None
    """CPU seconds every rank spent in those collectives (median)."""
    comm_alone_bytes: int | None = None
    compute_alone_s: float | None = None
    """sp=on median - comm_alone_s."""
    sp_on_s: float | None = None
    hidden_fraction: float | None = None
    """(sp=on - overlap) / comm_alone_s, from medians: the communication overlap hides."""

    # ---- pipeline (pp > 1)
    steps: int | None = None
    boundary_bytes: float | None = None
    """Bytes per step crossing the stage boundaries (sends less the sampled tokens' logits)."""
    boundary_min_bytes: float | None = None
    boundary_ratio: float | None = None
    p2p: dict | None = None

    # ---- cost model
    predicted_s: float | None = None
    """costmodel.step_time on the chosen hardware profile (seqpar prefill records)."""

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """A record read back from a --json file."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"bench record with unknown fields {unknown}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The JSON form: the fields that apply."""
        return {k: v for k, v in asdict(self).items() if v is not None}
