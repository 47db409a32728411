"""The operator's side of contribution scoring: the coalition value function on the real model,
and one round's scores in open mode (individual updates) or secure mode (group sums).

v(S) = L(global) - L(global + aggregate(S)): mean validation loss over the domains, on a few
held-out batches per domain. Everything else (GTG-Shapley, group estimation, shares) lives in
aggregation/ as pure code (shapley.py, groups.py, group_estimator.py, contribution.py).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aggregation.free_riders import duplicate_members, is_null_update, novel_descent
from aggregation.robust import update_norm
from aggregation.groups import group_shapley
from aggregation.shapley import Coalition, ShapleyEstimate, gtg_shapley
from aggregation.fedavg import Update
from model.precision import Precision
from model.lora import LoraMoE, expert_of
from model.moe import evaluate_loss

TINY = 1e-3  # an update this small next to the round's median norm moves nothing: a free rider's
COPY_COSINE = 0.95  # a copy with noise up to ~1/3 of the update's size still points this way
NOVEL_Z = 4.0  # descent z of what nobody else sent, below which an update adds nothing (aggregation/free_riders.py)


@dataclass
class CoalitionValue:
    """v(S) on the model: applies S's aggregated update to the global state and evaluates."""

    lora: LoraMoE
    state: Mapping[str, torch.Tensor]
    combine: Callable[[Coalition], dict[str, torch.Tensor]]  # S -> aggregated delta
    val_sets: Mapping[str, torch.Tensor]
    batch_size: int
    precision: Precision
    # the server optimizer's step (state, delta) -> state, so that a coalition is valued on the
    # model the round would commit; None: plain FedAvg, state + delta
    step: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None
    # the tensors the round moves. With `step`, every coalition's step covers all of them (zeros
    # for those it did not send), and so does the base: v(S) is measured against the round in
    # which everybody sent zeros, where a server optimizer's momentum still moves the model.
    # Against the unchanged model instead, each coalition's value would carry that momentum's
    # value, the same for every group of a round (measured on the secure demo: two groups of one
    # round valued 0.0040 and 0.0028), and a member sending zeros would be worth it.
    moved: frozenset[str] = frozenset()
    evaluations: int = 0
    _base: float | None = field(default=None, repr=False)
    # losses already measured on these val_sets: coalition -> loss. Secure rounds are scored after
    # the round's evaluation, whose head is the loss of the model all groups together commit.
    known: dict[Coalition, float] = field(default_factory=dict)

    def loss(self, delta: Mapping[str, torch.Tensor]) -> float:
        if self.step is not None:
            padded = {**{n: torch.zeros_like(self.state[n]) for n in self.moved if n not in delta}, **delta}
            self.lora.set_state(dict(self.step(self.state, padded)))
        else:
            self.lora.set_state({k: v + delta[k] if k in delta else v for k, v in self.state.items()})
        self.lora.model.to(self.precision.device)
        with self.lora.merged() as model:  # the same forward as the round's evaluation (`known`)
            losses = [
                evaluate_loss(model, blocks, batch_size=self.batch_size, device=self.precision.device,
                              autocast_dtype=self.precision.autocast_dtype)
                for blocks in self.val_sets.values()
            ]
        self.evaluations += 1
        return sum(losses) / len(losses)

    def gradients(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per validation domain, the gradient of its mean loss at the round's starting state."""
        self.lora.set_state(dict(self.state))
        model = self.lora.model.to(self.precision.device)
        out = {}
        try:
            for domain, blocks in self.val_sets.items():
                model.zero_grad(set_to_none=True)
                evaluate_loss(model, blocks, batch_size=self.batch_size, device=self.precision.device,
                              autocast_dtype=self.precision.autocast_dtype, backward=True)
                out[domain] = {k: v.cpu() for k, v in self.lora.get_grad().items()}
        finally:
            model.zero_grad(set_to_none=True)
        return out

    def __call__(self, coalition: Coalition) -> float:
        if not coalition:
            return 0.0
        if self._base is None:
            self._base = self.loss({})
        known = self.known.get(frozenset(coalition))
        return self._base - (known if known is not None else self.loss(self.combine(coalition)))


@dataclass(frozen=True)
class RoundScores:
    scores: dict[str, float]  # member -> value credited this round (open mode: Shapley)
    evaluations: int
    null_members: list[str]
    duplicates: list[tuple[str, str]]
    group_values: dict[str, float] = field(default_factory=dict)  # secure mode: "a+b+c" -> value
    novelty: dict[str, float] = field(default_factory=dict)  # open mode: member -> descent z of what only it sent


def score_open(
    updates: Sequence[Update], value: CoalitionValue, *, seed: int, max_permutations: int = 60,
    references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> RoundScores:
    """Per-member Shapley values from individual updates; free riders get no credit:
    - a null update (zeros), one far smaller than the round's others (< TINY x the median
      norm: it moves nothing), or a replay of the consortium's last change (cosine >=
      COPY_COSINE) scores 0;
    - so does one whose part that the round's other updates and the consortium's public history
      (`references`: name -> tensors, server/history.py: the last rounds' changes and the path
      so far, all computable from the views a member holds) do not explain shows no descent on
      any validation domain (z < NOVEL_Z, aggregation/free_riders.novel_descent): a replay of
      any kept round's change or a mixture of them, a copy of another member's update, pure
      noise, each with any noise added; the original of a copy keeps its credit unless the copy
      is nearly exact;
    - copies of each other that both pass (cosine >= COPY_COSINE) share one value.
    Whatever scores 0 is left out of the Shapley game; its update is still aggregated (bounded
    by the norm rule, server/validate.py). Noise the test misses (a false pass, about once in
    30,000 per domain) scatters around zero, and the score book sums before it clips."""
    norms = {u.member: update_norm(u) for u in updates}
    median = statistics.median(norms.values()) if norms else 0.0
    null = {u.member for u in updates if is_null_update(u.delta) or norms[u.member] < TINY * median}
    references = dict(references or {})
    for name, reference in references.items():  # a replay (or a nonlinear twist of one, e.g. signs, the fit misses)
        replayed = duplicate_members({**{u.member: u.delta for u in updates if u.member not in null}, name: reference},
                                     threshold=COPY_COSINE)
        null |= {a if b == name else b for a, b in replayed if name in (a, b)}
    kept = {u.member: u.delta for u in updates if u.member not in null}
    novelty = novel_descent(kept, value.gradients(), references) if kept else {}
    null |= {m for m, z in novelty.items() if not z >= NOVEL_Z}  # NaN included
    scored = [u for u in updates if u.member not in null]
    pairs = duplicate_members({u.member: u.delta for u in scored}, threshold=COPY_COSINE)
    scores = dict.fromkeys(sorted(null), 0.0)
    if scored:
        estimate: ShapleyEstimate = gtg_shapley(
            [u.member for u in scored], value, rng=random.Random(seed),
            max_permutations=max_permutations, duplicates=pairs,
        )
        scores.update({m: float(v) for m, v in estimate.values.items()})
    return RoundScores(scores, value.evaluations, sorted(null), pairs, novelty=novelty)


def open_value(lora: LoraMoE, state: Mapping[str, torch.Tensor], updates: Sequence[Update],
               val_sets: Mapping[str, torch.Tensor], batch_size: int, precision: Precision,
               step: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
               base: float | None = None,  # the loss of `state` on `val_sets`, when already known
               ) -> CoalitionValue:
    """v(S) for individual updates: S's part of the round's aggregate.

    The round applies sum_i w_i delta_i / W (per tensor; W = every member's weight, as in
    aggregation/fedavg.py). A coalition is valued by its own terms of that sum over the same W,
    so values are additive in members: a zero update adds nothing anywhere (its Shapley value is
    exactly zero) and nobody gains by diluting a harmful member, as with a coalition's own mean.
    """
    sums = {u.member: _weighted(u) for u in updates}
    round_weights = _total_weights([w for _, w in sums.values()])
    return CoalitionValue(
        lora, state,
        lambda s: combine_group_sums([sums[m] for m in sorted(s)], reference=round_weights),
        val_sets, batch_size, precision, step, moved=frozenset(round_weights), _base=base,
    )


def group_sum(updates: Sequence[Update]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(weighted delta sum, weight sums) of `updates`: what secure aggregation of their group
    gives the server (the input of `score_groups`; bench/contribution.py builds it in the clear)."""
    return _sum_of([_weighted(u) for u in updates])


def _sum_of(parts: Sequence[tuple[dict[str, torch.Tensor], dict[str, float]]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    deltas: dict[str, torch.Tensor] = {}
    for delta, _ in parts:
        for name, tensor in delta.items():
            deltas[name] = deltas[name] + tensor if name in deltas else tensor.clone()
    return deltas, _total_weights([w for _, w in parts])


def _weighted(update: Update) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(w * delta, w) per tensor, with the weights aggregation/fedavg.py uses."""
    deltas, weights = {}, {}
    for name, delta in update.delta.items():
        group = expert_of(name)
        w = float(update.num_tokens if group is None else update.expert_tokens.get(group, 0))
        if w > 0:
            deltas[name], weights[name] = delta * w, w
    return deltas, weights


def score_groups(
    group_deltas: Mapping[frozenset[str], tuple[dict[str, torch.Tensor], dict[str, float]]],
    value_of: Callable[[Callable[[Coalition], dict[str, torch.Tensor]]], CoalitionValue],
    *,
    seed: int,
) -> RoundScores:
    """Secure mode: each group's (weighted delta sum, weight sums) is all the server has.

    A union of groups is valued by its part of the round's actual aggregate: the sum of its
    groups' sums divided by the whole round's weight per tensor. That keeps values additive in
    members: a member that sends nothing adds nothing to its group's sum, and cannot look useful
    by diluting a harmful group-mate (as it would if each union were averaged on its own).
    `group_shapley` gives each group its Shapley value among the round's groups.
    """
    groups = list(group_deltas)
    round_weights = _total_weights([w for _, w in group_deltas.values()])

    def combine(coalition: Coalition) -> dict[str, torch.Tensor]:
        chosen = [g for g in groups if g <= coalition]
        return combine_group_sums([group_deltas[g] for g in chosen], reference=round_weights)

    value = value_of(combine)
    value.moved = frozenset(combine_group_sums(list(group_deltas.values())))  # what the round's step moves
    values = group_shapley(groups, value, rng=random.Random(seed))
    return RoundScores(
        scores={}, evaluations=value.evaluations, null_members=[], duplicates=[],
        group_values={"+".join(sorted(g)): float(v) for g, v in values.items()},
    )


def _total_weights(weights: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for w in weights:
        for name, value in w.items():
            total[name] = total.get(name, 0.0) + value
    return total


def combine_group_sums(
    sums: Sequence[tuple[dict[str, torch.Tensor], dict[str, float]]],
    *,
    reference: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Delta from groups' weighted sums: sum_g S_g[name] / W[name], where W is `reference`
    (e.g. the whole round's weights) or, when None, the chosen groups' own weights (their mean)."""
    totals, own = _sum_of([({n: t for n, t in d.items() if w.get(n, 0.0) > 0}, w) for d, w in sums])
    weights = reference if reference is not None else own
    return {name: totals[name] / weights[name] for name in totals if weights.get(name, 0.0) > 0}
