"""Contribution shares: per-round scores accumulated into each member's share of the value.

Contribution scoring measures what each member's update is worth on held-out validation loss.
It is split by idea; this module holds what they share (`ContributionError`, `check_members`)
and where their scores end up:
  aggregation/shapley.py          open mode: a round's Shapley values (exact, GTG-Shapley)
  aggregation/groups.py           secure mode: random or rotating groups, each group's value,
                                  and what a group's size reveals (the privacy trade-off)
  aggregation/group_estimator.py  secure mode: per-member values recovered across rounds
  aggregation/free_riders.py      null updates and copies of another member's update

Shares: `ScoreBook` accumulates per-round scores into contribution shares. A negative round score
is clipped to zero before it is added (a member that hurt the model earns nothing that round; it
does not go into debt), shares are totals over their sum, and when nobody has earned anything all
shares are zero. Totals are the value delivered, in nats of validation loss, so a round that
improved the model a lot weighs more than one that barely moved it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise


class ContributionError(ValueError):
    """Inputs that cannot be scored (duplicate member ids, non-finite values, a round recorded twice)."""


def check_members(members: Sequence[str]) -> list[str]:
    """The member ids in name order; a ContributionError when one appears twice."""
    ordered = sorted(members)
    for a, b in pairwise(ordered):
        if a == b:
            raise ContributionError(f"member {a!r} appears twice")
    return ordered


def contribution_shares(totals: Mapping[str, float]) -> dict[str, float]:
    """Non-negative totals -> shares summing to 1 (all zero when nothing was earned)."""
    members = sorted(totals)
    clipped = [max(0.0, totals[m]) for m in members]
    whole = math.fsum(clipped)
    if whole <= 0.0:
        return {m: 0.0 for m in members}
    return {m: t / whole for m, t in zip(members, clipped)}


@dataclass(frozen=True)
class ScoreBook:
    """Per-member value delivered, accumulated over rounds; the cumulative total is clipped at 0
    when it becomes a share, not each round's estimate: E[max(0, noise)] > 0, so clipping every
    round would let an update of pure noise build up share round after round, while its raw
    estimates sum to about zero."""

    totals: Mapping[str, float] = field(default_factory=dict)
    rounds: tuple[int, ...] = ()

    def add(self, server_round: int, scores: Mapping[str, float]) -> ScoreBook:
        """A new book with one round's scores added; each round may be added once."""
        if server_round in self.rounds:
            raise ContributionError(f"round {server_round} is already in the score book")
        totals = dict(self.totals)
        for member in sorted(scores):
            score = scores[member]
            if not math.isfinite(score):
                raise ContributionError(
                    f"round {server_round}: member {member!r} has non-finite score {score}"
                )
            totals[member] = totals.get(member, 0.0) + float(score)
        return ScoreBook(dict(sorted(totals.items())), self.rounds + (server_round,))

    def shares(self) -> dict[str, float]:
        return contribution_shares(self.totals)
