"""The adaptive schedule in the round loop: each round's local steps follow the decision on the
committed rounds, reach the members with TRAIN, and are recorded with the round."""

from __future__ import annotations


import pytest

from aggregation.schedule import decide
from client.app import app
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.rounds import run_rounds
from server.sampling import record_of
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, SentTrain, task_identity


def test_adaptive_rounds_train_the_steps_the_schedule_decided(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    cfg = RunConfig(
        workspace=str(ws.root), num_rounds=3, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="fp16", contribution="off",
        schedule="adaptive", schedule_min_steps=3, schedule_max_steps=6, lr=0.02,
    ).validated()
    sent = SentTrain()
    with task_identity(), caplog.at_level("WARNING"):
        run_rounds(FakeGrid(app, 3, before=sent), cfg, LogReporter(), run_name="adaptive")
    manifests = Checkpoints(ws.run_dir("adaptive")).manifests()
    for rnd in (1, 2, 3):
        expected = decide([record_of(m, cfg) for m in manifests[:rnd]], cfg.schedule_config(),
                          local_steps=cfg.local_steps, members_per_round=0, min_members=2)
        assert {ins.local_steps for ins in sent.by_round[rnd]} == {expected.local_steps}, rnd
        assert manifests[rnd]["run_config"]["local-steps"] == expected.local_steps
        assert manifests[rnd]["schedule"] == expected.reason
        assert f"round {rnd}: {expected.reason}" in caplog.text
        # the members' token counts are bounded by the round's own budget, and were accepted
        assert all(m["num_tokens"] == expected.local_steps * 4 * 64 for m in manifests[rnd]["members"])
    assert manifests[1]["drift"] is not None and manifests[1]["drift"] > 0  # open rounds measure it
    assert manifests[1]["run_config"]["local-steps"] == 3  # the schedule, not the run's 2: min-steps 3
