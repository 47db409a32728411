"""Record-level ε on its way from the member to the operator's people: the reply carries it, the
server checks it where it arrives, the ledger's `dp ε` column, the round table and `fedmoe report`
show it; a member whose budget is spent declines the round with one line."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from rich.console import Console

from aggregation.codec import UpdateRejected
from client.app import DP_BUDGET, serve_train
from client.node import Node
from fedmoe.console import round_tables
from fedmoe.report import write_report
from privacy.dp import BudgetSpent, DPConfig, DPConfigError
from protos.messages import TRAIN, ProtocolError, TrainInstruction, TrainReply
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.ledger import Ledger, OperatorKey
from server.ledger_sync import record_in_ledger
from server.summary import MemberReport, RoundSummary
from server.validate import check_counts
from tests.server.fake_grid import task_identity


def reply(**dp: float | None) -> TrainReply:
    return TrainReply(member="acme", round=2, update=b"u", view_sha256="ef" * 32, expert_tokens={"0:1": 10},
                      num_tokens=512, num_examples=8, train_loss=2.5, seconds=1.0, precision="fp32", **dp)  # type: ignore[arg-type]


def test_the_reply_carries_epsilon_and_delta_only_when_dp_is_on() -> None:
    on = reply(dp_epsilon=1.25, dp_delta=1e-5)
    assert TrainReply.from_record(on.to_record()) == on
    off = reply()
    record = off.to_record()
    assert "dp-epsilon" not in record.metric_records["metrics"]
    assert TrainReply.from_record(record).dp_epsilon is None
    half = on.to_record()
    del half.metric_records["metrics"]["dp-delta"]  # ε without the δ it is stated at
    with pytest.raises(ProtocolError, match="lacks 'dp-delta'"):
        TrainReply.from_record(half)


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (float("nan"), 1e-5, "dp-epsilon nan is not a finite number >= 0"),
        (float("inf"), 1e-5, "dp-epsilon inf is not a finite number >= 0"),
        (-0.5, 1e-5, "dp-epsilon -0.5 is not a finite number >= 0"),
        (1.0, 0.0, "dp-delta 0.0 is not in (0, 1)"),
        (1.0, 1.5, "dp-delta 1.5 is not in (0, 1)"),
    ],
)
def test_the_server_refuses_a_bad_epsilon_where_it_arrives(epsilon: float, delta: float, message: str) -> None:
    config = RunConfig(local_steps=2, batch_size=4, seq_len=64)
    check_counts(reply(dp_epsilon=0.0, dp_delta=1e-5), config)  # 0 is fine: nothing spent yet
    with pytest.raises(UpdateRejected) as info:
        check_counts(reply(dp_epsilon=epsilon, dp_delta=delta), config)
    assert f"member 'acme': {message}" == str(info.value)


def _member(name: str, epsilon: float | None) -> dict[str, object]:
    return {"member": name, "node_id": 1, "bytes_down": 400, "bytes_up": 120, "num_tokens": 256, "train_loss": 3.0,
            "seconds": 1.0, "experts_sent": 4, "precision": "fp32", "secagg_seconds": 0.0,
            "dp_epsilon": epsilon, "dp_delta": 1e-5 if epsilon is not None else None}


def _commit(run_dir: Path) -> Checkpoints:
    checkpoints = Checkpoints(run_dir)
    for rnd in range(3):
        members = [_member("acme", 0.5 * rnd), _member("globex", None)] if rnd else []
        checkpoints.commit(rnd, {"w": torch.zeros(2)}, {
            "time": f"2026-01-01T00:0{rnd}:00Z", "val_loss": {"code": 5.0 - 0.1 * rnd}, "members": members,
            "rejected": {}, "bytes_up": 240, "bytes_down": 800, "seconds": 3.0, "shares": {},
        })
    return checkpoints


def test_the_ledger_records_each_members_epsilon_in_its_dp_column(tmp_path: Path) -> None:
    checkpoints = _commit(tmp_path / "run")
    ledger = Ledger(tmp_path / "ledger.sqlite", OperatorKey.load_or_create(tmp_path / "op.pem"))
    record_in_ledger(ledger, checkpoints, RunConfig(local_steps=2, batch_size=4, seq_len=64))
    spent = {(r.round, r.member): r.dp_epsilon for r in ledger.records() if r.kind == "contribution"}
    assert spent == {(1, "acme"): 0.5, (1, "globex"): None, (2, "acme"): 1.0, (2, "globex"): None}
    assert all(r.dp_epsilon is None for r in ledger.records() if r.kind != "contribution")


def test_the_round_table_shows_the_largest_epsilon_and_fits_80_columns() -> None:
    members = [MemberReport("acme", 1, 2_500_000, 51_000, 4096, 3.0, 9.5, 8, "bf16", dp_epsilon=2.345, dp_delta=1e-5),
               MemberReport("globex", 2, 2_500_000, 51_000, 4096, 3.0, 9.5, 8, "bf16", dp_epsilon=0.5, dp_delta=1e-5)]
    summaries = [RoundSummary(0, {"code": math.log(300.0)}), RoundSummary(1, {"code": math.log(290.0)}, members, seconds=31.4)]
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    for table in round_tables(summaries):
        console.print(table)
    text = out.getvalue()
    assert "max dp ε" in text and "2.35" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    plain = io.StringIO()
    Console(file=plain, width=80).print(round_tables([RoundSummary(1, {"code": 1.0}, members[:1] * 0)])[1])
    assert "dp ε" not in plain.getvalue()  # nobody uses DP: no column


def test_fedmoe_report_has_a_privacy_table(tmp_path: Path) -> None:
    _commit(tmp_path / "run")
    report = write_report(tmp_path / "run", tmp_path / "out")
    text = report.summary.read_text()
    assert "## Differential privacy (record-level, per member)" in text
    assert "| round | ε acme |" in text and "| 2 | 1 |" in text and "δ 1e-05" in text


def test_node_config_turns_dp_on_per_member_and_refuses_bad_values() -> None:
    hints = type("Hints", (), {"base_path": "/b", "members_dir": "/m", "nodes_dir": "/n"})()
    plain = Node.from_node_config({"data-path": "/data/acme"}, hints)
    assert plain.dp is None
    node = Node.from_node_config({"data-path": "/data/acme", "dp": "on", "dp-target-epsilon": "8"}, hints)
    assert node.dp == DPConfig(target_epsilon=8.0, delta=1e-5, clip_norm=1.0)
    with pytest.raises(DPConfigError, match="dp-delta '0.5x'"):
        Node.from_node_config({"data-path": "/data/acme", "dp": "on", "dp-target-epsilon": "8", "dp-delta": "0.5x"}, hints)


def _ins() -> TrainInstruction:
    return TrainInstruction(
        round=3, run="default", state=b"", state_kind="full", base_view_sha256="", view_sha256="cd" * 32,
        base_sha256="ab" * 32, base_path="/b", members_dir="/m", nodes_dir="/n", local_steps=2, batch_size=4,
        seq_len=64, lr=0.01, local_opt="sgd", seed=7, min_expert_tokens=5, codec="fp16", codec_clip=0.0,
        update_clip=0.0, codec_seed=99, precision="auto", secure=False, balance="member", expert_load=b"",
        balance_weight=1.0, server_optimizer="",
    )


def test_a_member_whose_budget_is_spent_declines_with_one_line(tmp_path: Path) -> None:
    def spent(ins: TrainInstruction, node: Node) -> TrainReply:
        raise BudgetSpent("DP budget spent: ε 7.9 of 8 (δ 1e-05); this round's 12 steps would bring it to 8.3, so the member no longer trains")

    context = Context(run_id=1, node_id=5, node_config={"data-path": str(tmp_path / "acme"), "dp": "on",
                                                         "dp-target-epsilon": "8"}, state=RecordDict(), run_config={})
    with task_identity():
        msg = Message(_ins().to_record(), dst_node_id=5, message_type=TRAIN)
        answer = serve_train(msg, context, spent)
    assert answer.has_error() and answer.error.code == DP_BUDGET
    assert answer.error.reason.startswith("member 'acme': DP budget spent: ε 7.9 of 8")
    assert "\n" not in answer.error.reason


def test_fedmoe_join_passes_dp_settings_as_node_config_and_refuses_bad_ones_before_starting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmoe.cli import app as cli

    args = ["join", "--superlink", "127.0.0.1:1", "--member", "acme", "--data", str(tmp_path), "--ca", str(tmp_path / "ca.pem"),
            "--key", str(tmp_path / "k"), "--state-dir", str(tmp_path / "s")]
    for bad, message in ((["--dp", "target-epsilon=0"], "--dp: node config dp-target-epsilon '0': expected a number > 0"),
                         (["--dp", "target-epsilon=8", "--dp", "epsilon=4"], "--dp: node config dp-epsilon: unknown DP key")):
        result = CliRunner().invoke(cli, [*args, *bad])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
