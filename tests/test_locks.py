"""vpotool.locks: one writer per output. A second holder (in this process or another) is refused with one line
naming the holder, a lock left by a dead process is taken over, and leaving the ``with`` block frees it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vpotool.errors import VpoError
from vpotool.locks import acquire_output_lock, lock_path

HOLD = """import sys
from vpotool.locks import acquire_output_lock
lock = acquire_output_lock(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin or kills this process
"""


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_second_holder_is_refused_until_the_first_releases(tmp_path):
    out = tmp_path / "run" / "labels.parquet"
    with acquire_output_lock(out) as lock:
        assert lock.held and lock.path == lock_path(out) == out.parent / ".labels.parquet.lock"
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(VpoError) as refused:
            acquire_output_lock(out, flag="--out")
        message = str(refused.value)
        assert "\n" not in message and str(out) in message and f"PID {os.getpid()}" in message
        assert "another --out" in message
        assert lock.path.read_text() == f"{os.getpid()}\n"  # the refused one leaves the holder's file alone
        with acquire_output_lock(tmp_path / "run" / "other.parquet"):  # another output: its own lock
            pass
    assert not lock.held and not lock.path.exists()
    with acquire_output_lock(out):  # free again
        pass


def test_released_on_exit_even_after_an_error_and_release_twice_is_harmless(tmp_path):
    out = tmp_path / "labels.parquet"
    with pytest.raises(RuntimeError), acquire_output_lock(out):
        raise RuntimeError("the stage failed")
    assert not lock_path(out).exists()
    lock = acquire_output_lock(out)
    lock.release()
    lock.release()
    assert not lock_path(out).exists()


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "labels.parquet"
    pid = dead_pid()
    lock_path(out).write_text(f"{pid}\n")  # what a SIGKILLed writer leaves behind
    with acquire_output_lock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_another_process_holds_it_until_killed(tmp_path):
    out = tmp_path / "labels.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=env) as holder:  # fmt: skip
        try:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(VpoError, match=f"another vpotool process \\(PID {holder.pid}, lock .labels.parquet"):
                acquire_output_lock(out)
        finally:
            holder.kill()
    assert lock_path(out).read_text() == f"{holder.pid}\n"  # killed: its file stays, its lock does not
    with acquire_output_lock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_a_terminated_stage_releases_its_lock_and_says_how_to_resume(tmp_path):
    """SIGTERM (torchrun stopping the rest of a launch, SLURM preempting) unwinds a stage as Ctrl-C does: the lock
    file goes, finished rows stay, and the line says to rerun."""
    import signal
    import time

    from conftest import FAST

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vpotool", "sample", "--prompts", str(prompts), "--candidates", "8", "--batch-size",
           "2", "--out", str(out), *FAST]  # fmt: skip
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) as run:
        lock = lock_path(out / "samples.parquet")
        deadline = time.monotonic() + 120
        while not (out / "samples.parquet").exists() and time.monotonic() < deadline:  # the first batch is saved
            time.sleep(0.05)
        assert lock.exists()
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not lock.exists()
