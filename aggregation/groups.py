"""Secure-mode contribution groups: who is summed together each round, and what each group is worth.

Secure mode (the server sees only sums):
  `random_groups` splits a round's members into disjoint random groups of at least `min_group`;
  each group is securely aggregated on its own, so the server learns one sum per group. Any union
  of groups can then be valued, so `group_shapley` gives each group its Shapley value among the
  round's groups, and aggregation/group_estimator.py's `GroupValueEstimator` recovers per-member
  values across rounds: rounds with different random groups make the members separable. A
  consortium of fewer than 2 x min_group members cannot be split into two groups;
  `rotating_subsets` then picks one group of min_group members per round from a balanced schedule
  (every subset once per block, so members and pairs are observed equally often), and the others
  sit the round out.

  Privacy trade-off. A group's sum is exactly what plain secure aggregation reveals for the whole
  round, but over fewer people: the smaller the group, the more the sum says about each member's
  update. A group of one reveals that member's update outright; in a group of two, each member
  can subtract its own update and learn the other's. `min_group` (default 3) is therefore a
  privacy parameter, and with fewer than `min_group` members the round is one group of everybody
  (with a single member that "sum" is its update -- no worse than the round without grouping, but
  not private). Groups within a round are disjoint: differences of overlapping sums would expose
  individuals. The secure-aggregation layer must also refuse to unmask a group whose survivors
  after dropouts fall below `min_group`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from itertools import combinations

from aggregation.contribution import ContributionError, check_members
from aggregation.shapley import Coalition, exact_shapley, gtg_shapley

_MAX_SCHEDULE = 1024  # subsets enumerated by rotating_subsets; beyond, random ones


def random_groups(
    members: Sequence[str], min_group: int = 3, *, rng: random.Random
) -> list[frozenset[str]]:
    """Disjoint random groups covering `members`, each of size >= min_group (sizes differ by <= 1).

    The number of groups is len(members) // min_group; fewer than `min_group` members form one
    group of everybody (see the module docstring for what that reveals). The result depends only
    on the set of members and the state of `rng`.
    """
    if min_group < 1:
        raise ContributionError(f"min_group must be >= 1, got {min_group}")
    ordered = check_members(members)
    if not ordered:
        return []
    rng.shuffle(ordered)
    count = max(1, len(ordered) // min_group)
    size, extra = divmod(len(ordered), count)
    groups: list[frozenset[str]] = []
    start = 0
    for g in range(count):
        end = start + size + (1 if g < extra else 0)
        groups.append(frozenset(ordered[start:end]))
        start = end
    return groups


def rotating_subsets(members: Sequence[str], size: int, index: int, *, seed: str) -> frozenset[str]:
    """Group `index` (0, 1, ...) of a balanced schedule of `size`-subsets of `members`.

    For a round loop that can afford only one group of `size` out of fewer than 2*size members:
    every subset comes once per block of C(n, size) consecutive indices, in an order shuffled per
    block (seeded by `seed` and the block), so over each block every member sits in a group
    equally often and every pair of members shares one equally often -- the design under which
    least squares separates members best. With more than `_MAX_SCHEDULE` subsets a random
    subset per index instead. Depends only on the set of members, `size`, `index` and `seed`.
    """
    ordered = check_members(members)
    if not 1 <= size <= len(ordered):
        raise ContributionError(f"subset size {size} is not in 1..{len(ordered)}")
    if index < 0:
        raise ContributionError(f"schedule index {index} is negative")
    count = math.comb(len(ordered), size)
    if count > _MAX_SCHEDULE:
        return frozenset(random.Random(f"{seed}|index|{index}").sample(ordered, size))
    block, position = divmod(index, count)
    schedule = [frozenset(c) for c in combinations(ordered, size)]
    random.Random(f"{seed}|block|{block}").shuffle(schedule)
    return schedule[position]


def group_shapley(
    groups: Sequence[frozenset[str]],
    value: Callable[[Coalition], float],
    *,
    rng: random.Random,
    exact_up_to: int = 6,
    max_permutations: int = 200,
    truncation: float = 0.01,
    convergence: float = 0.02,
) -> dict[frozenset[str], float]:
    """Shapley value of each group among the round's groups; `value` gets the union of members.

    Exact for at most `exact_up_to` groups (2^g evaluations, no more than GTG would need), else
    GTG-Shapley. The result is what `GroupValueEstimator.observe` takes.
    """
    ids = {f"g{i:04d}": g for i, g in enumerate(groups)}
    seen: set[str] = set()
    for g in groups:
        if seen & g:
            raise ContributionError(f"groups overlap on {sorted(seen & g)}")
        seen |= g

    def union_value(chosen: Coalition) -> float:
        return value(frozenset().union(*(ids[c] for c in chosen)))

    if len(ids) <= exact_up_to:
        est = exact_shapley(list(ids), union_value)
    else:
        est = gtg_shapley(
            list(ids),
            union_value,
            rng=rng,
            max_permutations=max_permutations,
            truncation=truncation,
            convergence=convergence,
        )
    return {ids[c]: v for c, v in est.values.items()}
