"""What the operator sees in the terminal: progress bars while rounds run, a table per round."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.summary import RoundSummary


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def round_tables(summaries: list[RoundSummary]) -> tuple[Table, Table]:
    """(validation perplexity per domain by round, members and traffic by round): two tables so
    that each reads whole in an 80-column terminal."""
    domains = sorted({d for s in summaries for d in s.val_loss})
    quality = Table(title="validation perplexity per domain (lower is better)")
    quality.add_column("round", justify="right")
    for d in domains:
        quality.add_column(d, justify="right", no_wrap=True)
    traffic = Table(title="members and traffic per round")
    dp = any(m.dp_epsilon is not None for s in summaries for m in s.members)  # a column only when someone uses DP
    for col in ("round", "members", "sent per member", "received per member", "seconds", *(["max dp ε"] if dp else [])):
        traffic.add_column(col, justify="right", no_wrap=True)
    for s in summaries:
        n = max(len(s.members), 1)
        quality.add_row(str(s.round), *(f"{math.exp(s.val_loss[d]):.1f}" if d in s.val_loss else "-" for d in domains))
        traffic.add_row(
            str(s.round),
            str(len(s.members)) if s.round else "-",
            human_bytes(s.bytes_up / n) if s.members else "-",
            human_bytes(s.bytes_down / n) if s.members else "-",
            f"{s.seconds:.1f}" if s.round else "-",
            *([max_epsilon(s)] if dp else []),
        )
    return quality, traffic


def max_epsilon(summary: RoundSummary) -> str:
    """The largest record-level ε spent among the round's members ("-" when none uses DP)."""
    spent = [m.dp_epsilon for m in summary.members if m.dp_epsilon is not None]
    return f"{max(spent):.3g}" if spent else "-"


class RichReporter:
    """Reporter for the embedded consortium: the ServerApp's progress events, replayed here by
    fedmoe/simulation.py, move the bars."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console,
        )
        self.rounds_task = None
        self.members_task = None

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        if resumed:
            self.console.print(f"resuming from the last committed round: continuing at round {first_round}")
        self.progress.start()
        self.rounds_task = self.progress.add_task("rounds", total=num_rounds, completed=first_round - 1)

    def round_started(self, rnd: int, num_members: int) -> None:
        if self.members_task is not None:
            self.progress.remove_task(self.members_task)
        self.members_task = self.progress.add_task(f"round {rnd}: members trained", total=num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        if self.members_task is not None:
            self.progress.update(self.members_task, completed=done)

    def round_finished(self, summary: RoundSummary) -> None:
        if self.rounds_task is not None:
            self.progress.update(self.rounds_task, completed=summary.round)
        losses = "  ".join(f"{d} {math.exp(v):.1f}" for d, v in sorted(summary.val_loss.items()))
        self.progress.console.print(
            f"round {summary.round} committed ({summary.seconds:.1f}s, {len(summary.members)} members): val ppl {losses}"
        )
        spent = [f"{m.member} {m.dp_epsilon:.3g}" for m in summary.members if m.dp_epsilon is not None]
        if spent:
            self.progress.console.print(f"  record-level dp ε spent so far: {'  '.join(spent)}")
        if summary.shares:
            shares = "  ".join(f"{m} {s:.0%}" for m, s in sorted(summary.shares.items()))
            self.progress.console.print(f"  contribution shares so far: {shares}")
        if summary.dp_member_epsilon is not None:
            self.progress.console.print(f"  member-level DP: ε {summary.dp_member_epsilon:.2f} spent so far")

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/yellow]")

    def stop(self) -> None:
        self.progress.stop()


TIER_WORDS = {"latest": "every release", "delayed": "older releases", "base-only": "base model only"}


def rights_table(entitlements: dict[str, "object"], roles: dict[str, str]) -> Table:
    """What each member's credited contribution share entitles it to (fits 80 columns)."""
    table = Table(title="what each member gets (contribution share -> rights)")
    for column, justify in (("member", "left"), ("role", "left"), ("share", "right"), ("may use", "left"), ("token quota", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for member in sorted(entitlements):
        ent = entitlements[member]
        table.add_row(
            member, roles.get(member, "honest"), f"{ent.share:.1%}", TIER_WORDS[ent.tier],  # type: ignore[attr-defined]
            f"{ent.quota_tokens:,}",  # type: ignore[attr-defined]
        )
    return table
