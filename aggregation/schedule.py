"""Adaptive synchronization: each round's local steps and members, from the rounds before it.

The loss-driven schedule reads the committed rounds (so a resumed run decides the same) and
moves the number of local steps between synchronizations:
- validation loss rose, or the members' updates disagree much more than the round before
  (client drift): halve the local steps, members wander apart between synchronizations;
- loss falls slowly (less than `slow` relative per round): 1.5x the local steps, more local
  compute per synchronization costs no extra bytes;
- otherwise keep them.
Then the budgets cap it: the members' training time per round (seconds per local step as
measured last round) caps the steps, the bytes per round (per member, as measured) cap the
members per round, never below min-members. A fixed schedule keeps the configured values.
Every decision carries its reason in words, for the log and the manifest. Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

SCHEDULES = ("fixed", "adaptive")


@dataclass(frozen=True)
class Schedule:
    mode: str = "fixed"
    min_steps: int = 2
    max_steps: int = 64
    round_seconds: float = 0.0  # budget for a member's training in a round; 0: none
    round_bytes: int = 0  # budget for a round's bytes up and down, all members; 0: none
    slow: float = 0.005  # relative validation-loss drop per round below which training is "slow"
    drift_jump: float = 1.5  # drift this many times the previous round's counts as client drift

    def __post_init__(self) -> None:
        checks = [
            (self.mode in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.mode!r}"),
            (1 <= self.min_steps <= self.max_steps, "schedule-min-steps must be >= 1 and <= schedule-max-steps"),
            (self.round_seconds >= 0, "round-seconds-budget must be >= 0"),
            (self.round_bytes >= 0, "round-bytes-budget must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class RoundRecord:
    """What the schedule learns from one committed round."""

    round: int
    local_steps: int
    members: int
    val_loss: float  # mean over the validation domains
    bytes_per_member: float  # up and down
    seconds_per_step: float  # the slowest member's training seconds per local step
    drift: float | None = None  # members' disagreement (open rounds); None when unknown


@dataclass(frozen=True)
class Decision:
    local_steps: int
    members_per_round: int  # 0: every connected member
    reason: str


def decide(
    history: Sequence[RoundRecord], schedule: Schedule, *, local_steps: int, members_per_round: int, min_members: int
) -> Decision:
    """The next round's steps and members; `history` is the committed rounds, round 0 first."""
    if schedule.mode == "fixed":
        return Decision(local_steps, members_per_round, "fixed schedule")
    trained = [r for r in history if r.members > 0]
    if not trained:
        return Decision(_clamp(local_steps, schedule), members_per_round, "no round trained yet: configured local steps")
    last = trained[-1]
    at = history.index(last)
    before = history[at - 1] if at > 0 else None
    steps, why = last.local_steps, []
    if before is None:
        why.append("no loss slope yet: keep")
    else:
        drop = (before.val_loss - last.val_loss) / before.val_loss
        previous = trained[-2] if len(trained) >= 2 else None
        jumped = (
            last.drift is not None and previous is not None and previous.drift is not None and previous.drift > 0
            and last.drift > schedule.drift_jump * previous.drift
        )
        if drop < 0:
            steps = max(schedule.min_steps, steps // 2)
            why.append(f"validation loss rose {-drop:.2%}: halve local steps (client drift)")
        elif jumped:
            steps = max(schedule.min_steps, steps // 2)
            why.append(f"members' updates disagree {last.drift / previous.drift:.1f}x more than the round before: halve local steps")  # type: ignore[operator, union-attr]
        elif drop < schedule.slow:
            steps = min(schedule.max_steps, math.ceil(steps * 1.5))
            why.append(f"validation loss fell only {drop:.2%}: 1.5x local steps")
        else:
            why.append(f"validation loss fell {drop:.2%}: keep")
    steps = _clamp(steps, schedule)
    if schedule.round_seconds > 0 and math.isfinite(last.seconds_per_step) and last.seconds_per_step > 0:
        fits = max(schedule.min_steps, int(min(schedule.round_seconds / last.seconds_per_step, schedule.max_steps)))
        if steps > fits:
            steps = fits
            why.append(f"capped at {fits} steps by the {schedule.round_seconds:g}s training budget")
    members = members_per_round
    if schedule.round_bytes > 0 and last.bytes_per_member > 0:
        fits = int(schedule.round_bytes / last.bytes_per_member)
        if fits < min_members:
            members = min_members
            why.append(f"the {schedule.round_bytes} B budget fits {fits} member(s), fewer than min-members: {min_members}")
        elif members == 0 or fits < members:
            members = fits
            why.append(f"{fits} members per round fit the {schedule.round_bytes} B budget")
    return Decision(steps, members, f"{steps} local steps: " + "; ".join(why))


def update_drift(deltas: Sequence[Mapping[str, torch.Tensor]]) -> float | None:
    """Mean over members of ||Δ_i - mean Δ|| / ||mean Δ|| on the tensors all of them sent."""
    if len(deltas) < 2:
        return None
    shared = sorted(set.intersection(*(set(d) for d in deltas)))
    if not shared:
        return None
    flat = torch.stack([torch.cat([d[n].flatten().double() for n in shared]) for d in deltas])  # (M, P)
    mean = flat.mean(dim=0)
    norm = float(mean.norm())
    if norm == 0:
        return None
    return float((flat - mean).norm(dim=1).mean()) / norm


def _clamp(steps: int, schedule: Schedule) -> int:
    return min(schedule.max_steps, max(schedule.min_steps, steps))
