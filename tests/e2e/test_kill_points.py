"""SIGKILL at each kill point (server/faults.py), then a restart: the run resumes, the committed
state is bit-identical to an uninterrupted run's, the ledger verifies, and no group sum is
unmasked twice over different survivors.

Each run is its own Python process (the operator's round loop with the members' real ClientApp
in-process through the test grid, so the kill takes the members' process down too: their state
dirs are what survives, as on a real SuperNode's disk). The same points over a real SuperLink,
its SuperNodes staying up while the ServerApp is killed: tests/e2e/test_deployment.py.

What a restart does, by where the kill fell:
- after-train and inside a secure-aggregation stage (in-advertise, in-share, in-mask, in-check,
  in-unmask): nothing was decoded or journaled, so the round is re-run from TRAIN. The members
  train it again from the same view, round and seed: the identical update, under the same
  `trained-from` key (client/secure.py). The protocol is run in a new session (a fresh nonce:
  members never advertise in one session twice), so keys, masks and shares are all new: shares a
  member revealed in the killed attempt (in-unmask) are of keys no longer used, and cannot join
  the new session's to unmask both a member's self mask and its pairwise masks. It helps unmask
  this update again only for the same survivor list (its unmask record), so the operator can
  never difference two sums over different survivors. All five members come back here, so the re-run's sums, and the state,
  are bit-identical (member-level DP noise too: its seed is kept per `trained-from`). Where
  identity cannot hold: a member under DP-SGD trains the round again with fresh noise, so the
  re-run's sum (and every state after it) differs; and a member gone for good after in-unmask
  leaves the others refusing any other survivor list.
- after-unmask: the sums were decoded but not journaled, so the re-run unmasks the round again:
  the same survivors' identical updates, the identical sum (asserted: logged twice, one digest).
- after-journal, mid-commit: the round finishes from its journal; nothing is asked of the
  members again (each sum is decoded once). mid-commit: the round's files were written but
  COMMITTED still names round 0, so they are rewritten.
- after-commit, mid-ledger: round 1 is committed; the restart puts it in the ledger (mid-ledger:
  the killed append transaction left nothing behind) and runs round 2.
- mid-export: the release folder is the previous whole release, or absent; a re-export completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.io import sha256_file
from server.checkpoint import Checkpoints
from server.faults import ENV, ROUND_KILL_POINTS
from server.ledger.audit import verify
from server.ledger import OperatorKey
from server.workspace import Workspace

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parents[1]
UNMASKED = "unmasked.jsonl"  # in the workspace: one line per group sum the operator decoded
# The runs of rounds are forked from one process that has only imported the project, which is
# most of a run's time here (5 s of 6); each run is still its own process, SIGKILLed on its own.
RUNS = f"""
import json, os, random, sys, traceback
import numpy
sys.path[:0] = [{str(TESTS / "server")!r}, {str(TESTS)!r}]
import server.secure_stages as stages
from client.app import app
from fake_grid import FakeGrid, task_identity
from server.config import RunConfig
from server.faults import ENV
from server.journal import state_digest
from server.rounds import run_rounds
from server.summary import LogReporter
aggregate = stages.secure_aggregate
def logged(grid, **kwargs):  # every decoded group sum, written before the round loop goes on
    out = aggregate(grid, **kwargs)
    with open(f"{{WS}}/{UNMASKED}", "a") as log:
        for members, (sums, _) in out.sums.items():
            log.write(json.dumps({{"round": kwargs["rnd"], "members": sorted(members), "sha256": state_digest(sums)}}) + "\\n")
    return out
stages.secure_aggregate = logged
def run(ws):
    config = RunConfig(workspace=ws, num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="randk0.2+int8", codec_clip=0.05,
                       secagg="on", secagg_timeout=5.0, secagg_threshold=3, contribution="off")
    with task_identity():
        run_rounds(FakeGrid(app, 5), config, LogReporter(), run_name="k")
for line in sys.stdin:
    ws, kill_at = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the run: a process of its own
        WS = ws
        random.seed()  # as a fresh process's would be: not its siblings' sequences
        numpy.random.seed()
        log = os.open(ws + "/runs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.pop(ENV, None)
        os.environ.update({{ENV: kill_at}} if kill_at else {{}})
        try:
            run(ws)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
EXPORT = "from fedmoe.cli import main; main()"  # `fedmoe`, from this checkout


def _env(kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill_at:
        env[ENV] = kill_at
    return env


@pytest.fixture(scope="module")
def runs() -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen([sys.executable, "-c", RUNS], env=_env(None), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as forker:
        yield forker
        assert forker.stdin is not None
        forker.stdin.close()


def _run(runs: subprocess.Popen[str], ws: Path, kill_at: str | None = None) -> int:
    """The run's exit code: -SIGKILL for a run killed at `kill_at`. Its output: <ws>/runs.log."""
    assert runs.stdin is not None and runs.stdout is not None
    runs.stdin.write(json.dumps([str(ws), kill_at]) + "\n")
    runs.stdin.flush()
    while not (line := runs.stdout.readline()).startswith("exit "):  # whatever else the imports print
        assert line, "the process that forks the runs has died"
    return int(line.split()[1])


def _unmasked(ws: Path) -> list[tuple[int, tuple[str, ...], str]]:
    lines = (ws / UNMASKED).read_text().splitlines()
    return [(e["round"], tuple(e["members"]), e["sha256"]) for e in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference_ws(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory,
                 runs: subprocess.Popen[str]) -> Workspace:
    root = tmp_path_factory.mktemp("reference") / "ws"
    shutil.copytree(tiny_workspace.root, root, ignore=shutil.ignore_patterns("runs", "nodes", "identities.json"))
    assert _run(runs, root) == 0
    return Workspace(root)


@pytest.fixture(scope="module")
def reference(reference_ws: Workspace) -> list[str]:
    return [m["state_sha256"] for m in Checkpoints(reference_ws.run_dir("k")).manifests()]


@pytest.mark.parametrize("point", ROUND_KILL_POINTS)
def test_a_sigkill_at_each_kill_point_resumes_to_the_uninterrupted_state(
    point: str, ws: Workspace, reference: list[str], runs: subprocess.Popen[str]
) -> None:
    assert _run(runs, ws.root, kill_at=point) == -signal.SIGKILL
    committed = Checkpoints(ws.run_dir("k")).latest_round()
    assert committed == (1 if point in ("after-commit", "mid-ledger") else 0)  # killed in round 1
    revealed = list(ws.root.glob("nodes/*/secagg/revealed.json"))  # members' unmask records
    assert bool(revealed) == (ROUND_KILL_POINTS.index(point) >= ROUND_KILL_POINTS.index("in-unmask"))
    assert _run(runs, ws.root) == 0
    assert [m["state_sha256"] for m in Checkpoints(ws.run_dir("k")).manifests()] == reference
    report = verify(ws.ledger("k"), OperatorKey.load_or_create(ws.operator_key).public_key)
    assert report.ok, report.problem
    unmasked = _unmasked(ws.root)
    assert len({(rnd, members, digest) for rnd, members, digest in unmasked}) == 2  # one sum per round, ever
    times = Counter(rnd for rnd, _, _ in unmasked)
    assert times == {1: 2 if point == "after-unmask" else 1, 2: 1}  # only a sum never journaled is decoded again


def _whole_release(out: Path) -> dict[str, str]:
    """The release's files (path -> sha256) after checking that they are exactly what its
    release.json lists, each with its digest: a whole release, not a half-written one."""
    info = json.loads((out / "release.json").read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"release.json"}
    assert files == set(info["sha256"])
    assert all(sha256_file(out / f) == digest for f, digest in info["sha256"].items())
    return info["sha256"]


def _export(ws: Workspace, out: Path, kill_at: str | None = None) -> int:
    args = ["export", "--workspace", str(ws.root), "--run-name", "k", "--out", str(out)]
    return subprocess.run([sys.executable, "-c", EXPORT, *args], env=_env(kill_at), capture_output=True, timeout=600).returncode


def test_a_sigkill_mid_export_leaves_the_previous_release_or_none(reference_ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "release"
    assert _export(reference_ws, out, kill_at="mid-export") == -signal.SIGKILL
    assert not out.exists()  # the staging folder beside it is half-written; `out` never was
    assert _export(reference_ws, out) == 0  # the re-run completes over the leftover staging folder
    first = _whole_release(out)
    assert _export(reference_ws, out, kill_at="mid-export") == -signal.SIGKILL
    assert _whole_release(out) == first  # the previous release, whole
    assert json.loads((out / "release.json").read_text())["round"] == 2
