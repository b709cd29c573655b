"""Ctrl-C and kill -9 on ``compare --jobs 2``, with real signals: everything stops at once,
queued runs do not start, one line is printed, nothing is left running."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ARGS = ["compare", "--strategies", "naive,replay", "--seeds", "0", "1"]
ARGS += ["--quick", "--epochs", "3", "--jobs", "2", "--no-progress"]


def _start(out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "avalanche_d2l", *ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal gives a command
        # a command typed in a terminal receives Ctrl-C even when the test suite itself was
        # started in the background (where the shell sets SIGINT to be ignored, and the child
        # would inherit that)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_checkpoint(proc, out, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((out / "checkpoints").glob("*.pkl")):
            return psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.1)
    pytest.fail(f"no checkpoint appeared (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _gone(procs, timeout=15):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_stops_workers_and_queued_runs_with_one_line(tmp_path):
    out = tmp_path / "o"
    proc = _start(out)
    children = _wait_for_checkpoint(proc, out)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.time() - t0 < 20
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("avalanche-d2l:")]
    assert len(lines) == 1 and "run the same command to resume" in lines[0], stderr
    assert not _gone(children)
    before = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    time.sleep(3)  # nothing writes after the command returned (no queued run started)
    after = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert len(list((out / "runs").glob("*.json"))) < 4


def test_workers_die_with_a_killed_parent(tmp_path):
    out = tmp_path / "o"
    proc = _start(out)
    children = _wait_for_checkpoint(proc, out)
    assert any("spawn" in " ".join(c.cmdline()) for c in children)
    proc.kill()
    proc.communicate(timeout=60)
    assert not _gone(children)
