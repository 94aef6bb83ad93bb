"""A dying rank never leaves the others hanging or orphaned."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from seqpar import LLM, SamplingParams


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_killed_rank_makes_driver_raise(tiny):
    llm = LLM(str(tiny("llama-mqa-tied")), tensor_parallel_size=3, sequence_parallel="on",
              threads_per_rank=1)
    pids = [p.pid for p in llm.cluster.spawner.procs]
    victim = pids[1]

    def kill_when_running():
        while llm.engine.steps["sp"] < 3:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"seqpar-rank2 killed by signal 9"):
        llm.generate([[5, 6, 7]] * 8, SamplingParams(max_tokens=240, temperature=0, ignore_eos=True))
    assert time.monotonic() - start < 30
    assert wait_gone(pids, 10) == [], "ranks left behind after a rank died"
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5]], SamplingParams(max_tokens=1))


SCRIPT = textwrap.dedent("""
    import sys, time
    from seqpar import LLM, SamplingParams
    llm = LLM(sys.argv[1], tensor_parallel_size=2, threads_per_rank=1)
    llm.generate([[5, 6]], SamplingParams(max_tokens=2))
    print(" ".join(str(p.pid) for p in llm.cluster.spawner.procs), flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(60)
    # else: fall off the end without close()
""")


def test_interpreter_exit_ends_ranks(tiny, tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tiny("qwen2")), "exit"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 1
    assert wait_gone(pids, 10) == []


def test_killed_driver_takes_ranks_down(tiny, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny("qwen2")), "sleep"],
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids, "the script did not start its ranks"
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, 10) == [], "ranks outlived their driver"
    finally:
        proc.kill()


SITECUSTOMIZE = textwrap.dedent("""
    # Test-only: make rank 1 raise inside its third step (loaded by spawned ranks via PYTHONPATH).
    import os
    if os.environ.get("SEQPAR_TEST_FAIL_RANK"):
        import seqpar.worker.model_runner as runner
        original = runner.ModelRunner.execute
        def execute(self, plan):
            self.steps_seen = getattr(self, "steps_seen", 0) + 1
            if self.comm.rank == int(os.environ["SEQPAR_TEST_FAIL_RANK"]) and self.steps_seen == 3:
                raise ArithmeticError("injected failure in rank 1")
            return original(self, plan)
        runner.ModelRunner.execute = execute
""")


def test_raising_rank_reports_its_error(tiny, tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SEQPAR_TEST_FAIL_RANK", "1")
    llm = LLM(str(tiny("qwen2")), tensor_parallel_size=2, threads_per_rank=1)
    pids = [p.pid for p in llm.cluster.spawner.procs]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ArithmeticError: injected failure"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert time.monotonic() - start < 30
    assert wait_gone(pids, 10) == []
