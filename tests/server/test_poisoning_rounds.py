"""Poisoned updates in the round loop (open mode): a member that scales its update is bounded,
and an update that makes validation loss non-finite aborts the round without committing it or
breaking the run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aggregation.codec import decode, encode
from aggregation.codec_config import CodecConfig
from client.app import app
from model.base import load_base
from protos.messages import TRAIN, TrainReply
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.rounds import RoundAborted, run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity


def config(ws: Workspace, **overrides: object) -> RunConfig:
    base = RunConfig(
        workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="fp32", contribution="open",
    )
    return base.with_overrides(**overrides)


def scaling(ws: Workspace, node: int, factor: float):
    """The members' ClientApp, except that `node` multiplies its real update by `factor`."""
    shapes = load_base(ws.base).with_lora().shapes()
    fp32 = CodecConfig.parse("fp32")

    def serve(message, context):  # noqa: ANN001, ANN202
        reply = app(message, context)
        if context.node_id != node or message.metadata.message_type != TRAIN or reply.has_error():
            return reply
        parsed = TrainReply.from_record(reply.content)
        delta = decode(parsed.update, shapes, member=parsed.member, max_bytes=1 << 28, seed=0, config=fp32)
        poisoned = encode({k: v * factor for k, v in delta.items()}, fp32, seed=0)
        reply.content = dataclasses.replace(parsed, update=poisoned).to_record()
        return reply

    return serve


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() - b[k].double()).square().sum() for k in a) ** 0.5)


def test_a_member_scaling_its_update_x10_is_bounded_by_the_rounds_median(ws: Workspace, caplog) -> None:
    with task_identity():
        run_rounds(FakeGrid(app, 4), config(ws), LogReporter(), run_name="clean")
        run_rounds(FakeGrid(scaling(ws, 1003, 10.0), 4), config(ws, update_norm_bound=0.0), LogReporter(), run_name="open-door")
        caplog.clear()
        run_rounds(FakeGrid(scaling(ws, 1003, 10.0), 4), config(ws), LogReporter(), run_name="bounded")
    attacker = ws.members()[3]
    assert f"member {attacker!r}: update L2 norm" in caplog.text and "scaled down to 3x" in caplog.text
    clean, open_door, bounded = (Checkpoints(ws.run_dir(r)).load().state for r in ("clean", "open-door", "bounded"))
    assert distance(bounded, clean) < 0.5 * distance(open_door, clean), (distance(bounded, clean), distance(open_door, clean))


def test_the_coordinate_median_resists_a_scaled_member_even_without_the_bound(ws: Workspace) -> None:
    with task_identity():
        run_rounds(FakeGrid(app, 5), config(ws, aggregator="median"), LogReporter(), run_name="clean")
        run_rounds(FakeGrid(scaling(ws, 1004, -10.0), 5), config(ws, update_norm_bound=0.0), LogReporter(), run_name="mean")
        run_rounds(FakeGrid(scaling(ws, 1004, -10.0), 5), config(ws, update_norm_bound=0.0, aggregator="median"),
                   LogReporter(), run_name="median")
    clean, mean, median = (Checkpoints(ws.run_dir(r)).load().state for r in ("clean", "mean", "median"))
    assert distance(median, clean) < 0.5 * distance(mean, clean), (distance(median, clean), distance(mean, clean))


def test_an_update_that_makes_validation_non_finite_is_rejected_and_the_round_goes_on(ws: Workspace) -> None:
    """Finite numbers, x1e30: contribution scoring finds the member whose update alone makes
    validation loss non-finite, rejects it with one line, and scores the others."""
    attacker = ws.members()[2]
    with task_identity():
        [summary] = run_rounds(FakeGrid(scaling(ws, 1002, 1e30), 3), config(ws, update_norm_bound=0.0), LogReporter(), run_name="nan")
    assert summary.rejected == {attacker: f"member {attacker!r}: its update makes validation loss non-finite"}
    assert {m.member for m in summary.members} == set(ws.members()[:2]) == set(summary.scores)
    assert all(math.isfinite(v) for v in summary.val_loss.values())


def test_without_scoring_a_non_finite_aggregate_aborts_the_round_uncommitted_and_the_run_resumes(ws: Workspace) -> None:
    cfg = config(ws, update_norm_bound=0.0, contribution="off")
    with task_identity():
        with pytest.raises(RoundAborted, match="makes validation loss non-finite on .*state stays at round 0"):
            run_rounds(FakeGrid(scaling(ws, 1002, 1e30), 3), cfg, LogReporter(), run_name="nan")
        assert Checkpoints(ws.run_dir("nan")).latest_round() == 0  # nothing committed
        [summary] = run_rounds(FakeGrid(app, 3), cfg, LogReporter(), run_name="nan")
    assert summary.round == 1 and len(summary.members) == 3
    assert all(math.isfinite(v) for v in summary.val_loss.values())


def test_a_robust_aggregator_is_refused_under_secure_aggregation(ws: Workspace) -> None:
    from server.config import ConfigError

    with pytest.raises(ConfigError, match="set aggregator = 'mean'"):
        config(ws, secagg="on", codec="int8", codec_clip=0.05, contribution="secure", aggregator="median")


def test_a_member_under_min_share_after_its_probation_is_no_longer_sampled(ws: Workspace, caplog) -> None:
    """Taking part is an entitlement too: a zero-update free rider gets TRAIN (the newest state)
    in its probation rounds only; honest members go on."""
    from server.rights import DEFAULT_POLICY_TOML

    ws.policy.parent.mkdir(parents=True, exist_ok=True)
    ws.policy.write_text(DEFAULT_POLICY_TOML.replace("probation_rounds = 3", "probation_rounds = 2"))
    grid = FakeGrid(scaling(ws, 1003, 0.0), 4)
    with task_identity():
        summaries = run_rounds(grid, config(ws, num_rounds=4), LogReporter(), run_name="probation")
    rider = ws.members()[3]
    trained = [rnd.round for rnd in summaries if rider in {m.member for m in rnd.members}]
    assert trained == [1, 2]
    assert sum(1 for node, kind in grid.seen if node == 1003 and kind == TRAIN) == 2
    assert all(len(s.members) == 3 for s in summaries[2:])
    assert f"member {rider!r} stays under min_share after its probation: no longer sampled" in caplog.text
    assert caplog.text.count("no longer sampled") == 1  # said once, not every round


def test_nobody_is_judged_while_nobody_is_credited() -> None:
    from server.ledger import Record
    from server.rights import Policy, past_probation

    def line(rnd, member, share, kind):  # noqa: ANN001, ANN202
        return Record(rnd, member, 0.0, share, 0, 0, 0, None, "cd" * 32, "2025-01-01T00:00:00Z", kind)

    young = [line(r, m, 0.0, k) for r in (1, 2, 3, 4) for m in "ab" for k in ("contribution", "share")]
    assert past_probation(Policy(), young) == set()  # a secure run before any estimate stands out
    credited = young + [line(5, "a", 1.0, "share"), line(5, "b", 0.0, "share")]
    assert past_probation(Policy(), credited) == {"b"}
    assert past_probation(Policy(probation_rounds=0), credited) == set()
    assert past_probation(Policy(probation_rounds=5), credited) == set()  # b took part in 4 rounds only
