"""Defences against poisoned updates in open mode: a bound on each update's L2 norm relative to
the round's median, and robust per-tensor aggregation (coordinate-wise median or trimmed mean).

Norm bound (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): an update whose L2
norm exceeds `bound` x the round's median norm is scaled down to that norm, so a member that
scales its update x10 weighs no more than an honest large one. The median needs at least three
updates to mean anything (with two, one of them sets half of it), so with fewer the bound is
not applied, and the caller says so.

Robust aggregation (Yin et al. 2018, "Byzantine-Robust Distributed Learning"): per tensor, over
the members that sent it (with a positive weight), the coordinate-wise median, or the mean after
dropping the `trim` fraction of largest and smallest values of each coordinate. Both ignore the
token weights: those are self-reported, and weighting would let an inflated claim move the
statistic. Per expert the set of members differs (a member sends only experts it routed to).
Limit: over one or two senders there is no robust statistic (the median of two is their mean),
so an expert tensor that only the attacker and one other member sent moves with the attacker's
scale (measured: shared tensors stay put under a x-100 member, expert tensors do not); there
the norm bound is what limits it, so keep `update-norm-bound` on with a robust aggregator.

Under secure aggregation the operator sees only sums: neither applies there. What bounds a
member's influence then is the shared codec clip (every coordinate in [-clip, clip], so an
update's L2 norm is at most clip x sqrt(coordinates)); the operator cannot check more, and the
run config refuses a robust aggregator with secagg on.

torch has no weighted or masked coordinate-wise median / trimmed mean over a ragged set of
members, hence these few lines.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from aggregation.fedavg import Update, aggregate
from aggregation.free_riders import delta_norm

AGGREGATORS = ("mean", "median", "trimmed-mean")


@dataclass(frozen=True)
class Bounded:
    updates: list[Update]
    clipped: dict[str, float]  # member -> its norm over the round's median, for those scaled down
    median: float


def update_norm(update: Update) -> float:
    return delta_norm(update.delta)


def clip_l2(delta: Mapping[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    """`delta` scaled down to L2 norm `bound` when it is longer (`bound` 0: unchanged). The
    member's side of the bound (run config `update-clip`): under secure aggregation nobody else
    can apply it."""
    norm = delta_norm(delta)
    if bound <= 0 or norm <= bound:
        return dict(delta)
    return {k: v * (bound / norm) for k, v in delta.items()}


def bound_norms(updates: Sequence[Update], bound: float) -> Bounded:
    """Scale every update whose L2 norm exceeds `bound` x the round's median norm down to it
    (`bound` 0, or fewer than 3 updates: unchanged)."""
    norms = {u.member: update_norm(u) for u in updates}
    median = statistics.median(norms.values()) if norms else 0.0
    if bound <= 0 or len(updates) < 3 or median <= 0:
        return Bounded(list(updates), {}, median)
    limit = bound * median
    out, clipped = [], {}
    for u in updates:
        if norms[u.member] > limit:
            scale = limit / norms[u.member]
            u = replace(u, delta={k: v * scale for k, v in u.delta.items()})
            clipped[u.member] = norms[u.member] / median
        out.append(u)
    return Bounded(out, clipped, median)


def robust_aggregate(
    updates: Sequence[Update], group_of: Callable[[str], str | None], method: str, trim: float = 0.2
) -> dict[str, torch.Tensor]:
    """Per tensor, over the members that sent it with a positive weight: "mean" (the token-
    weighted mean, aggregation/fedavg.py), "median" or "trimmed-mean" (`trim` of each side)."""
    if method == "mean":
        return aggregate(updates, group_of)
    if method not in AGGREGATORS:
        raise ValueError(f"aggregator {method!r} is not one of {', '.join(AGGREGATORS)}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"aggregator-trim {trim} must be in [0, 0.5)")
    by_name: dict[str, list[torch.Tensor]] = {}
    for u in sorted(updates, key=lambda u: u.member):  # order-independent (ties in median)
        for name, delta in u.delta.items():
            group = group_of(name)
            weight = u.num_tokens if group is None else u.expert_tokens.get(group, 0)
            if weight > 0:
                by_name.setdefault(name, []).append(delta.detach().float())
    out = {}
    for name, deltas in by_name.items():
        stacked = torch.stack(deltas)
        if method == "median":
            out[name] = stacked.median(dim=0).values if len(deltas) % 2 else _middle_mean(stacked)
        else:
            k = int(trim * len(deltas))
            ordered = stacked.sort(dim=0).values
            out[name] = ordered[k: len(deltas) - k].mean(dim=0)
    return out


def _middle_mean(stacked: torch.Tensor) -> torch.Tensor:
    """The median of an even count: the mean of the two middle values (torch takes the lower)."""
    ordered = stacked.sort(dim=0).values
    n = stacked.shape[0]
    return 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
