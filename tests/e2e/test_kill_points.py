"""SIGKILL at each kill point of a secure round (server/faults.py), then a restart: the run
resumes, the committed state is bit-identical to an uninterrupted run's, the ledger verifies, and
no group sum is unmasked twice (the members would refuse: client/secure.py).

Each run is its own Python process (the operator's round loop with the members' real ClientApp
in-process through the test grid, so the kill takes the members' process down too: their state
dirs are what survives, as on a real SuperNode's disk). What this does not cover: a real
SuperLink and SuperNodes killed apart from each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.checkpoint import Checkpoints
from server.faults import ENV, KILL_POINTS
from server.ledger.audit import verify
from server.ledger import OperatorKey
from server.workspace import Workspace

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parents[1]
RUN = f"""
import sys
sys.path[:0] = [{str(TESTS / "server")!r}, {str(TESTS)!r}]
from client.app import app
from fake_grid import FakeGrid, task_identity
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
config = RunConfig(workspace=sys.argv[1], num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                   min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="randk0.2+int8", codec_clip=0.05,
                   secagg="on", secagg_timeout=5.0, secagg_threshold=3, contribution="off")
with task_identity():
    run_rounds(FakeGrid(app, 5), config, LogReporter(), run_name="k")
"""


def _run(ws: Path, kill_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run([sys.executable, "-c", RUN, str(ws)], env=env, capture_output=True, timeout=600).returncode


@pytest.fixture(scope="module")
def reference(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("reference") / "ws"
    shutil.copytree(tiny_workspace.root, root, ignore=shutil.ignore_patterns("runs", "nodes", "identities.json"))
    assert _run(root) == 0
    return [m["state_sha256"] for m in Checkpoints(Workspace(root).run_dir("k")).manifests()]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_sigkill_at_each_kill_point_resumes_to_the_uninterrupted_state(point: str, ws: Workspace,
                                                                         reference: list[str]) -> None:
    assert _run(ws.root, kill_at=point) == -signal.SIGKILL
    committed = Checkpoints(ws.run_dir("k")).latest_round()
    assert committed == (1 if point == "after-commit" else 0)  # killed in round 1
    assert _run(ws.root) == 0
    assert [m["state_sha256"] for m in Checkpoints(ws.run_dir("k")).manifests()] == reference
    report = verify(ws.ledger("k"), OperatorKey.load_or_create(ws.operator_key).public_key)
    assert report.ok, report.problem
