"""The round tables a newcomer reads at the end of the demo: whole in an 80-column terminal."""

from __future__ import annotations

import io
import math

from rich.console import Console

from fedmoe.console import round_tables
from server.summary import MemberReport, RoundSummary

DOMAINS = ("changelogs", "code", "legal", "manuals", "readmes")


def summaries() -> list[RoundSummary]:
    member = MemberReport("changelogs", 1, 2_500_000, 51_000, 4096, 3.0, 9.5, 8, "bf16 on cpu")
    rounds = [RoundSummary(0, {d: math.log(300.0) for d in DOMAINS})]
    for r in range(1, 5):
        rounds.append(RoundSummary(r, {d: math.log(300.0 - 10 * r) for d in DOMAINS}, [member] * 5, seconds=31.4))
    return rounds


def test_both_tables_fit_80_columns_with_nothing_cut() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    for table in round_tables(summaries()):
        console.print(table)
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in (*DOMAINS, "members", "sent per member", "received per member", "260.0", "2.4 MB", "49.8 KB"):
        assert word in text, word


def test_the_demo_refuses_to_resume_a_run_trained_with_another_recipe_and_says_how_to_start_over(tmp_path, capsys) -> None:  # noqa: ANN001
    """A workspace whose demo run was trained before the demo's server optimizer changed cannot
    resume it (the round loop refuses other server-* settings); the demo says to use --fresh,
    before it starts anything, and leaves the committed rounds alone."""
    import pytest
    import torch
    import typer

    from fedmoe.cli import DEMO_TRAINING, _refuse_another_recipe
    from server.checkpoint import Checkpoints
    from server.config import RunConfig

    demo = RunConfig.from_user_config({"workspace": str(tmp_path), **DEMO_TRAINING})
    run_dir = tmp_path / "runs" / "demo"
    _refuse_another_recipe(run_dir, demo)  # no run yet: nothing to refuse
    checkpoints = Checkpoints(run_dir)
    older = {**demo.as_user_config(), "server-lr": 0.03}
    for rnd in (0, 1):
        checkpoints.commit(rnd, {"x": torch.zeros(2)}, {"run_config": older})
    with pytest.raises(typer.Exit):
        _refuse_another_recipe(run_dir, demo)
    said = " ".join(capsys.readouterr().out.split())
    assert "trained with server-lr 0.03" in said and "`fedmoe demo --fresh` starts the demo's run over" in said
    assert checkpoints.latest_round() == 1  # nothing lost
    _refuse_another_recipe(run_dir, RunConfig.from_user_config({**older, "workspace": str(tmp_path)}))  # same recipe: resumes
