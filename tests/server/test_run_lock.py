"""One process at a time runs a run's rounds (server/checkpoint.py hold_run): a second ServerApp on
a run still running (an operator who resubmits a run they think has hung) stops before it writes
anything; the lock dies with its holder, SIGKILL included, so a restart never finds it stale."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client.app import app
from server.checkpoint import Checkpoints, RunBusy, hold_run
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity

ROOT = Path(__file__).resolve().parents[2]
# another operator process in the middle of the run: it holds the lock until it is killed
HOLDER = "import sys, time; from pathlib import Path; from server.checkpoint import hold_run\n" \
         "with hold_run(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_second_process_on_a_running_run_stops_before_it_writes_and_a_killed_holder_leaves_no_lock(ws: Workspace) -> None:
    run_dir = ws.run_dir("busy")
    config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=8, min_members=2, codec="fp16", contribution="off")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with task_identity(), pytest.raises(RunBusy, match=rf"another process \(pid {holder.pid}\) is running this run"):
            run_rounds(FakeGrid(app, 3), config, LogReporter(), run_name="busy")
        assert Checkpoints(run_dir).latest_round() is None  # not even round 0 was committed
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with task_identity():  # the killed holder's lock died with it: the run goes on
        summaries = run_rounds(FakeGrid(app, 3), config, LogReporter(), run_name="busy")
    assert [s.round for s in summaries] == [1] and Checkpoints(run_dir).latest_round() == 1


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / "runs").mkdir()
    entered = []
    with hold_run(tmp_path / "runs" / "r"):
        entered.append(True)
    assert entered == [True]
    assert "running without the run lock (No locks available)" in caplog.text


def test_a_missing_workspace_is_left_to_the_run_and_nothing_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "runs" / "default"
    with hold_run(missing):
        pass
    assert not (tmp_path / "typo").exists()
