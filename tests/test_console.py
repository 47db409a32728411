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
