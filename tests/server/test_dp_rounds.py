"""Record-level DP in the round loop, with the real ClientApp: a member with `dp = on` in its node
config trains DP-SGD, its ε reaches the ledger's dp ε column each round from the budget file in
its state dir (read afresh every round, as after a daemon restart), and once the next round would
pass its budget it declines in one line while the round commits without it."""

from __future__ import annotations

import json

import pytest

from prometheus_client import CollectorRegistry

from client.app import app
from client.metrics import DaemonCollector
from fedmoe.cli import DEMO_TRAINING
from privacy.dp import BUDGET_FILE, epsilon_of
from server.config import RunConfig
from server.ledger import Ledger, OperatorKey
from server.metrics import PrometheusReporter
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace
from fake_grid import FakeGrid, task_identity


def config(ws: Workspace, **overrides: object) -> RunConfig:
    return RunConfig(
        workspace=str(ws.root), num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=60.0, codec="fp16", contribution="open",
    ).with_overrides(**overrides)


def test_epsilon_reaches_the_ledger_and_a_spent_budget_declines_the_round(ws: Workspace) -> None:
    member = ws.members()[0]  # FakeGrid: node 1000 is partition 0
    dp = {"dp": "on", "dp-target-epsilon": "1000", "dp-noise-multiplier": "1.0", "dp-clip-norm": "1.0"}
    grid = FakeGrid(app, 3)
    grid.contexts[1000].node_config.update(dp)
    reporter = PrometheusReporter(LogReporter())
    with task_identity():
        run_rounds(grid, config(ws), reporter, run_name="dp")
    budget_file = ws.root / "nodes" / member / BUDGET_FILE
    saved = json.loads(budget_file.read_text())
    history = [tuple(h) for h in saved["history"]]
    assert [n for _, _, n in history] in ([2], [1, 1])  # two rounds of one large-batch step (opacus merges equal entries)
    ledger = Ledger(ws.ledger("dp"), OperatorKey.load_or_create(ws.operator_key))
    spent = {(r.round, r.member): r.dp_epsilon for r in ledger.records() if r.kind == "contribution"}
    assert spent[(2, member)] == pytest.approx(epsilon_of(history, 1e-5))
    assert 0 < spent[(1, member)] < spent[(2, member)]
    assert all(eps is None for (_, m), eps in spent.items() if m != member)  # the others train without DP
    # the operator's metrics and the member daemon's show the same ε; the others have none
    assert reporter.registry.get_sample_value("fedmoe_dp_record_epsilon", {"member": member}) == spent[(2, member)]
    assert [m for m in ws.members() if reporter.registry.get_sample_value("fedmoe_dp_record_epsilon", {"member": m})] == [member]
    daemon = CollectorRegistry()
    daemon.register(DaemonCollector(budget_file.parent, member))
    assert daemon.get_sample_value("fedmoe_daemon_dp_epsilon", {"member": member}) == pytest.approx(spent[(2, member)])

    # the daemon restarts with a budget its next round cannot afford: it declines, the round goes on
    grid = FakeGrid(app, 3)
    grid.contexts[1000].node_config.update({**dp, "dp-target-epsilon": f"{spent[(2, member)] * 1.0001:.6g}"})
    with task_identity():
        (third,) = run_rounds(grid, config(ws, num_rounds=3), LogReporter(), run_name="dp")
    reason = third.rejected["node 1000"]
    assert f"member {member!r}: DP budget spent: ε" in reason and "\n" not in reason
    assert member not in {m.member for m in third.members} and len(third.members) == 2
    assert json.loads(budget_file.read_text()) == saved  # declining spends nothing


def test_a_run_where_every_member_trains_dp_sgd_lowers_validation_loss(ws: Workspace) -> None:
    """The demo's recipe (local SGD, FedYogi) with every member on DP-SGD at σ 0.2 (large-batch
    steps, the default) for two rounds: the members' own domains end the run with a lower mean
    validation loss (the noise is drawn from `secrets`, so each run differs: at σ 0.3, four runs
    ended 0.006-0.014 lower), and every member's ε is in the ledger."""
    dp = {"dp": "on", "dp-target-epsilon": "1000", "dp-noise-multiplier": "0.2", "dp-clip-norm": "1.0"}
    grid = FakeGrid(app, 3)
    for context in grid.contexts.values():
        context.node_config.update(dp)
    recipe = {k.replace("-", "_"): v for k, v in DEMO_TRAINING.items() if k != "local-steps"}
    with task_identity():
        summaries = run_rounds(grid, config(ws, num_rounds=2, local_steps=8, batch_size=8, eval_batches=2, **recipe),
                               LogReporter(), run_name="dp-all")
    start = json.loads((ws.run_dir("dp-all") / "round-0000" / "manifest.json").read_text())["val_loss"]
    members = [m.member for m in summaries[-1].members]
    drop = sum(start[d] - summaries[-1].val_loss[d] for d in members) / len(members)
    print(f"every member DP-SGD (σ 0.2), 2 rounds: mean validation loss of their domains {drop:.4f} lower")
    assert len(members) == 3 and drop > 0
    ledger = Ledger(ws.ledger("dp-all"), OperatorKey.load_or_create(ws.operator_key))
    last = {r.member: r.dp_epsilon for r in ledger.records() if r.kind == "contribution" and r.round == 2}
    assert sorted(last) == sorted(members) and all(eps is not None and 0 < eps < 1000 for eps in last.values())
