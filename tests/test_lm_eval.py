"""lm-evaluation-harness (nobody here wrote it) scores a small local log-likelihood task against
`seqpar serve` (its `local-completions` model: echo + logprobs) and against HF transformers on the
same checkpoint (its `hf` model): the same accuracy, and each choice's log-likelihood within
fp32 tolerance. The task's few JSON lines ship in tests/data (no hub download)."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_server import KEY, ServerProcess
from tokenized import build_with_tokenizer

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "lm_eval_tiny.jsonl"
TASK = """task: seqpar_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _evaluate(model: str, model_args: str, task_dir: Path) -> tuple[float, list[list[float]]]:
    """(accuracy, per document the log-likelihood of each choice)."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["seqpar_tiny"],
                                  task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, batch_size=1, device="cpu")
    samples = sorted(out["samples"]["seqpar_tiny"], key=lambda s: s["doc_id"])
    return (out["results"]["seqpar_tiny"]["acc,none"],
            [[resp[0][0] for resp in s["resps"]] for s in samples])


@pytest.mark.xfail(strict=True, reason="echo with logprobs needs prompt logprobs from the last "
                                       "stage (issue 21, after the sampler rework)")
def test_lm_eval_log_likelihood_matches_hf(tmp_path):
    model = build_with_tokenizer("llama-gqa", tmp_path)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "seqpar_tiny.yaml").write_text(TASK.format(data=DATA))
    want_acc, want = _evaluate("hf", f"pretrained={model},dtype=float32", tmp_path / "task")

    server = ServerProcess(model, "-tp", "2", "--sp", "on", "--api-key", KEY)
    try:
        import os
        os.environ["OPENAI_API_KEY"] = KEY
        acc, got = _evaluate("local-completions",
                             f"model=tiny,base_url={server.url}/v1/completions,tokenizer={model},"
                             "num_concurrent=1,max_retries=1,tokenized_requests=True",
                             tmp_path / "task")
    finally:
        server.kill()
    assert acc == want_acc
    assert got == pytest.approx(want, abs=2e-4)
