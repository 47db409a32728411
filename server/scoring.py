"""The operator's side of contribution scoring: the coalition value function on the real model,
and one round's scores in open mode (individual updates) or secure mode (group sums).

v(S) = L(global) - L(global + aggregate(S)): mean validation loss over the domains, on a few
held-out batches per domain. Everything else (GTG-Shapley, group estimation, shares) lives in
aggregation/contribution.py as pure code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aggregation.contribution import (
    Coalition,
    ShapleyEstimate,
    duplicate_members,
    group_shapley,
    gtg_shapley,
    is_null_update,
)
from aggregation.fedavg import Update, aggregate
from client.precision import Precision
from model.lora import LoraMoE, expert_of
from model.moe import evaluate_loss


@dataclass
class CoalitionValue:
    """v(S) on the model: applies S's aggregated update to the global state and evaluates."""

    lora: LoraMoE
    state: Mapping[str, torch.Tensor]
    combine: Callable[[Coalition], dict[str, torch.Tensor]]  # S -> aggregated delta
    val_sets: Mapping[str, torch.Tensor]
    batch_size: int
    precision: Precision
    evaluations: int = 0
    _base: float | None = field(default=None, repr=False)

    def loss(self, delta: Mapping[str, torch.Tensor]) -> float:
        self.lora.set_state({k: v + delta[k] if k in delta else v for k, v in self.state.items()})
        model = self.lora.model.to(self.precision.device)
        losses = [
            evaluate_loss(model, blocks, batch_size=self.batch_size, device=self.precision.device,
                          autocast_dtype=self.precision.autocast_dtype)
            for blocks in self.val_sets.values()
        ]
        self.evaluations += 1
        return sum(losses) / len(losses)

    def __call__(self, coalition: Coalition) -> float:
        if not coalition:
            return 0.0
        if self._base is None:
            self._base = self.loss({})
        return self._base - self.loss(self.combine(coalition))


@dataclass(frozen=True)
class RoundScores:
    scores: dict[str, float]  # member -> value credited this round (open mode: Shapley)
    evaluations: int
    null_members: list[str]
    duplicates: list[tuple[str, str]]
    group_values: dict[str, float] = field(default_factory=dict)  # secure mode: "a+b+c" -> value


def score_open(
    updates: Sequence[Update], value: CoalitionValue, *, seed: int, max_permutations: int = 60
) -> RoundScores:
    """Per-member Shapley values from individual updates; null updates and copies get no credit."""
    null = sorted(u.member for u in updates if is_null_update(u.delta))
    scored = [u for u in updates if u.member not in null]
    pairs = duplicate_members({u.member: u.delta for u in scored})
    scores = {m: 0.0 for m in null}
    if scored:
        estimate: ShapleyEstimate = gtg_shapley(
            [u.member for u in scored], value, rng=random.Random(seed),
            max_permutations=max_permutations, duplicates=pairs,
        )
        scores.update({m: float(v) for m, v in estimate.values.items()})
    return RoundScores(scores, value.evaluations, null, pairs)


def open_value(lora: LoraMoE, state: Mapping[str, torch.Tensor], updates: Sequence[Update],
               val_sets: Mapping[str, torch.Tensor], batch_size: int, precision: Precision) -> CoalitionValue:
    by_member = {u.member: u for u in updates}
    return CoalitionValue(
        lora, state, lambda s: aggregate([by_member[m] for m in sorted(s)], expert_of), val_sets, batch_size, precision
    )


def score_groups(
    group_deltas: Mapping[frozenset[str], tuple[dict[str, torch.Tensor], dict[str, float]]],
    value_of: Callable[[Callable[[Coalition], dict[str, torch.Tensor]]], CoalitionValue],
    *,
    seed: int,
) -> RoundScores:
    """Secure mode: each group's (weighted delta sum, weight sums) is all the server has.

    The union of groups is valued by combining their sums (sum of sums / sum of weights per
    tensor), exactly as the round's aggregate is formed; `group_shapley` gives each group its
    Shapley value among the round's groups.
    """
    groups = list(group_deltas)

    def combine(coalition: Coalition) -> dict[str, torch.Tensor]:
        chosen = [g for g in groups if g <= coalition]
        return combine_group_sums([group_deltas[g] for g in chosen])

    value = value_of(combine)
    values = group_shapley(groups, value, rng=random.Random(seed))
    return RoundScores(
        scores={}, evaluations=value.evaluations, null_members=[], duplicates=[],
        group_values={"+".join(sorted(g)): float(v) for g, v in values.items()},
    )


def combine_group_sums(sums: Sequence[tuple[dict[str, torch.Tensor], dict[str, float]]]) -> dict[str, torch.Tensor]:
    """Mean delta from groups' weighted sums: sum_g S_g[name] / sum_g W_g[name]."""
    totals: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for delta_sum, weight_sum in sums:
        for name, tensor in delta_sum.items():
            w = weight_sum.get(name, 0.0)
            if w <= 0:
                continue
            totals[name] = totals[name] + tensor if name in totals else tensor.clone()
            weights[name] = weights.get(name, 0.0) + w
    return {name: totals[name] / weights[name] for name in totals}
