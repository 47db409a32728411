"""A round aborted for too few members is retried with backoff, each retry in one line with its
reason, up to `round-retries`; on main the first abort ended the run (someone had to resubmit it)."""

from __future__ import annotations

import pytest

import server.rounds
from client.app import app
from server.checkpoint import Checkpoints
from server.config import ConfigError, RunConfig
from server.rounds import RoundAborted, TooFewMembers, run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity

from protos.messages import TRAIN


def _config(ws: Workspace, **overrides: object) -> RunConfig:
    return RunConfig(workspace=str(ws.root), num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                     min_expert_tokens=8, min_members=4, round_timeout=0.5, codec="fp16", contribution="off",
                     round_retries=3, round_retry_backoff=2.0).with_overrides(**overrides)


class Outage:
    """Members 1000 and 1001 are unreachable for the first `trains` TRAIN messages sent to them."""

    def __init__(self, trains: int) -> None:
        self.left = {1000: trains, 1001: trains}

    def __call__(self, node: int, kind: str) -> bool:
        if kind != TRAIN or self.left.get(node, 0) <= 0:
            return False
        self.left[node] -= 1
        return True


def test_an_aborted_round_is_retried_with_backoff_and_the_run_goes_on(ws: Workspace, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    waits: list[float] = []
    monkeypatch.setattr(server.rounds, "SLEEP", waits.append)
    grid = FakeGrid(app, 5, drop=Outage(trains=2))  # round 1: 3 of 5 reply twice (min-members 4), then all 5
    with task_identity():
        summaries = run_rounds(grid, _config(ws), LogReporter(), run_name="retry")
    assert [s.round for s in summaries] == [1, 2] and len(summaries[0].members) == 5
    assert waits == [2.0, 4.0]  # doubling
    assert "round 1: retry 1 of 3 in 2s (round 1 aborted: 3 valid update(s), min-members is 4" in caplog.text
    assert "round 1: retry 2 of 3 in 4s" in caplog.text and "retry 3 of 3" not in caplog.text
    assert Checkpoints(ws.run_dir("retry")).latest_round() == 2


def test_a_round_that_keeps_failing_stops_the_run_after_the_last_retry(ws: Workspace,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(server.rounds, "SLEEP", waits.append)
    grid = FakeGrid(app, 5, drop=Outage(trains=100))
    with task_identity(), pytest.raises(TooFewMembers, match="round 1 aborted: 3 valid"):
        run_rounds(grid, _config(ws, round_retries=2), LogReporter(), run_name="down")
    assert waits == [2.0, 4.0]
    assert sum(1 for node, kind in grid.seen if node == 1002 and kind == TRAIN) == 3  # the first try and 2 retries
    assert Checkpoints(ws.run_dir("down")).latest_round() == 0
    assert issubclass(TooFewMembers, RoundAborted)


def test_retry_settings_are_checked() -> None:
    for bad, match in ((dict(round_retries=-1), "round-retries"), (dict(round_retry_backoff=float("nan")), "round-retry-backoff")):
        with pytest.raises(ConfigError, match=match):
            RunConfig(**bad).validated()
