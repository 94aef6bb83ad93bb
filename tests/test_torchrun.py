"""The same engine under torchrun: every rank runs the script, rank 0 drives, all return the outputs."""
import json
import subprocess
import sys
import textwrap

from models import hf_reference
from seqpar.distributed.launch import free_port

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from seqpar import LLM, SamplingParams
    llm = LLM(sys.argv[1], tensor_parallel_size=2, sequence_parallel="on", threads_per_rank=1)
    outs = llm.generate([[5, 6, 7], [9, 10, 11, 12, 13]], SamplingParams(max_tokens=4, temperature=0,
                                                                      ignore_eos=True))
    outs2 = llm.generate([[8, 8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    # A prompt rank 0 rejects is rejected on every rank, so the next call runs in step.
    try:
        llm.generate([[8] * 1000], SamplingParams(max_tokens=2))
        raise SystemExit("a prompt longer than max_model_len was accepted")
    except ValueError as e:
        assert "max_model_len" in str(e), e
    outs2 += llm.generate([[8, 8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    # One write per line: the ranks share stdout, and print() writes each piece apart when unbuffered.
    sys.stdout.write(f"RESULT {os.environ['RANK']} {json.dumps([o.token_ids for o in outs + outs2])}\\n")
    llm.close()
""")


def test_torchrun_two_ranks(tiny, tmp_path):
    model = tiny("llama-gqa")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), str(model)],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(line.split(" ", 2)[1:] for line in done.stdout.splitlines()
                   if line.startswith("RESULT"))
    assert set(results) == {"0", "1"}
    assert results["0"] == results["1"], "ranks returned different outputs"
    expected = [t for t, _ in hf_reference(model, [[5, 6, 7], [9, 10, 11, 12, 13]], 4)]
    expected += [t for t, _ in hf_reference(model, [[8, 8]], 2)] * 2
    assert json.loads(results["0"]) == expected
