"""What a round leaves behind for people: the per-member report, the round summary, and the
`Reporter` through which the round loop tells the CLI, the logs and Prometheus how it goes."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("fedmoe.server")


@dataclass(frozen=True)
class MemberReport:
    member: str
    node_id: int
    bytes_down: int
    bytes_up: int
    num_tokens: int
    train_loss: float
    seconds: float
    experts_sent: int
    precision: str
    secagg_seconds: float = 0.0  # the member's time on the secure-aggregation stages
    dp_epsilon: float | None = None  # record-level DP: ε the member has spent so far (its reply); None: off
    dp_delta: float | None = None


@dataclass(frozen=True)
class RoundSummary:
    round: int
    val_loss: dict[str, float]
    members: list[MemberReport] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # member or node -> reason
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # contribution this round (val-loss drop)
    shares: dict[str, float] = field(default_factory=dict)  # cumulative contribution shares
    contribution: dict[str, object] = field(default_factory=dict)  # how scores were computed
    timing: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (Laps)
    specialization: dict[str, object] = field(default_factory=dict)  # how members share experts
    dp_member_epsilon: float | None = None  # member-level DP: ε spent by the consortium's sums so far (None: off)

    @property
    def bytes_up(self) -> int:
        return sum(m.bytes_up for m in self.members)

    @property
    def bytes_down(self) -> int:
        return sum(m.bytes_down for m in self.members)


class Laps:
    """Wall time per stage of a round: call it with the stage's name as each stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


class Reporter(Protocol):
    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None: ...
    def round_started(self, rnd: int, num_members: int) -> None: ...
    def member_done(self, rnd: int, done: int, total: int) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...
    def note(self, text: str) -> None: ...


class LogReporter:
    """Progress through Flower's log (a deployed ServerApp has no terminal of its own)."""

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        log.info("fedmoe: rounds %d..%d%s", first_round, num_rounds, " (resumed)" if resumed else "")

    def round_started(self, rnd: int, num_members: int) -> None:
        log.info("round %d: sent to %d members", rnd, num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        pass

    def round_finished(self, summary: RoundSummary) -> None:
        losses = ", ".join(f"{d}={v:.3f}" for d, v in summary.val_loss.items())
        log.info("round %d committed: val loss %s%s", summary.round, losses,
                 "" if summary.dp_member_epsilon is None else f" (member-level DP: ε {summary.dp_member_epsilon:.2f} spent)")

    def note(self, text: str) -> None:
        log.warning("%s", text)



EVENT = "fedmoe-event "  # prefix of EventReporter's lines in the run's log stream


class EventReporter:
    """Progress as one JSON line per event on stdout, for a caller that streams the run's log
    (`flwr run --stream`: fedmoe/simulation.py replays them into its own reporter)."""

    def _emit(self, event: str, **fields: Any) -> None:
        # one write, starting on a fresh line: another thread's output cannot land inside it
        sys.stdout.write("\n" + EVENT + json.dumps({"event": event, **fields}, default=str) + "\n")
        sys.stdout.flush()

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        self._emit("start", first_round=first_round, num_rounds=num_rounds, resumed=resumed)

    def round_started(self, rnd: int, num_members: int) -> None:
        self._emit("round_started", rnd=rnd, num_members=num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        self._emit("member_done", rnd=rnd, done=done, total=total)

    def round_finished(self, summary: RoundSummary) -> None:
        self._emit("round_finished", summary=asdict(summary))

    def note(self, text: str) -> None:
        self._emit("note", text=text)

    def failed(self, reason: str) -> None:
        self._emit("failed", reason=reason)

    def finished(self) -> None:
        self._emit("finished")


def summary_from_dict(data: dict[str, Any]) -> RoundSummary:
    """A RoundSummary from `asdict` (an EventReporter line, a round's manifest)."""
    known = {f for f in RoundSummary.__dataclass_fields__}
    values = {k: v for k, v in data.items() if k in known}
    values["members"] = [MemberReport(**m) for m in data.get("members", [])]
    return RoundSummary(**values)
