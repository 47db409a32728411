"""Shapley values of one round's members over a coalition game: exact, and GTG-Shapley estimation.

The value of a set S of members in a round is

    v(S) = L(global) - L(global + aggregate(updates of S))

the drop in validation loss when only S's aggregated update is applied (v(empty set) = 0). The
caller supplies v as a callable over frozensets of member ids (it rebuilds the coalition model and
evaluates it -- expensive); this module never sees the model. Every v is memoized per call of an
estimator and the number of real evaluations is reported.

Open mode (the server sees each member's update):
  `gtg_shapley` estimates per-round Shapley values with GTG-Shapley (Liu et al. 2022,
  "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation in Federated
  Learning"): between-round truncation (a round that moved the loss by almost nothing gives
  everybody zero), within-round truncation (a permutation stops once the coalition is within
  `truncation` x |v(all) - v(empty)| of the full round's value; the rest of it get marginal 0),
  guided sampling (permutation k puts member k mod n first, so everybody is measured alone
  equally often), and Monte-Carlo over permutations until the estimates' standard errors are small.
  `exact_shapley` enumerates all 2^n coalitions (tests, and tiny games).

Duplicates (pairs from aggregation/free_riders.py's `duplicate_members`): every coalition is
evaluated with each flagged cluster counted once (only its first member, by name, is kept), so
adding a copy to a coalition that already holds its original adds nothing and Shapley splits the
cluster's value equally among its members.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import numpy.typing as npt

from aggregation.contribution import ContributionError, check_members

Coalition = frozenset[str]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Valuation:
    """A coalition's value overall and per validation domain (each a drop in loss, nats)."""

    overall: float
    domains: Mapping[str, float] = field(default_factory=dict)


ValueFn = Callable[[Coalition], float | Valuation]


@dataclass(frozen=True)
class ShapleyEstimate:
    values: Mapping[str, float]  # member -> Shapley value (overall), sums to ~`total`
    domain_values: Mapping[str, Mapping[str, float]]  # domain -> member -> value; {} for floats
    total: float  # v(all) - v(empty), with duplicates counted once
    value_calls: int  # evaluations of the caller's value function (memoized, `known` excluded)
    permutations: int  # permutations sampled (0 for exact or truncated rounds)
    converged: bool  # running means settled before `max_permutations` (True for exact/truncated)
    truncated: bool  # between-round truncation: the round moved the loss by ~nothing


# ----------------------------------------------------------------------------- value cache


class _Game:
    """Memoized value function over canonical coalitions; values as vectors (overall, *domains)."""

    def __init__(
        self,
        value: ValueFn,
        duplicates: Sequence[tuple[str, str]],
        known: Mapping[Coalition, float | Valuation],
    ) -> None:
        self._value = value
        self._cache: dict[Coalition, FloatArray] = {}
        self._domains: tuple[str, ...] | None = None
        self.calls = 0
        # Union-find over duplicate pairs; a cluster is represented by its first name.
        parent: dict[str, str] = {}

        def find(m: str) -> str:
            while parent.get(m, m) != m:
                m = parent[m]
            return m

        for a, b in duplicates:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        self._root = {m: find(m) for m in {x for pair in duplicates for x in pair}}
        for coalition, v in known.items():
            self._cache[self.canonical(coalition)] = self._vector(coalition, v)

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains or ()

    def canonical(self, coalition: Coalition) -> Coalition:
        """Drop every member whose duplicate cluster is already represented by an earlier name."""
        if not self._root:
            return coalition
        kept: dict[str, str] = {}
        for m in sorted(coalition):
            kept.setdefault(self._root.get(m, m), m)
        return frozenset(kept.values())

    def _vector(self, coalition: Coalition, v: float | Valuation) -> FloatArray:
        if isinstance(v, Valuation):
            domains = tuple(sorted(v.domains))
            out = [v.overall, *(v.domains[d] for d in domains)]
        else:
            domains = ()
            out = [float(v)]
        if self._domains is None:
            self._domains = domains
        elif domains != self._domains:
            raise ContributionError(
                f"value of {sorted(coalition)} has domains {list(domains)}, "
                f"expected {list(self._domains)}"
            )
        arr = np.asarray(out, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ContributionError(f"value of {sorted(coalition)} is not finite: {out}")
        return arr

    def __call__(self, coalition: Coalition) -> FloatArray:
        key = self.canonical(coalition)
        if key not in self._cache:
            self._cache[key] = self._vector(key, self._value(key))
            self.calls += 1
        return self._cache[key]


def _estimate(
    game: _Game,
    members: list[str],
    phi: FloatArray,  # (n, 1 + domains)
    total: FloatArray,
    *,
    permutations: int,
    converged: bool,
    truncated: bool,
) -> ShapleyEstimate:
    return ShapleyEstimate(
        values={m: float(phi[i, 0]) for i, m in enumerate(members)},
        domain_values={
            d: {m: float(phi[i, 1 + j]) for i, m in enumerate(members)}
            for j, d in enumerate(game.domains)
        },
        total=float(total[0]),
        value_calls=game.calls,
        permutations=permutations,
        converged=converged,
        truncated=truncated,
    )


# ----------------------------------------------------------------------------- Shapley


def exact_shapley(
    members: Sequence[str],
    value: ValueFn,
    *,
    duplicates: Sequence[tuple[str, str]] = (),
    known: Mapping[Coalition, float | Valuation] | None = None,
) -> ShapleyEstimate:
    """Shapley values by enumerating all 2^n coalitions: phi_i = sum_S w(|S|) (v(S+i) - v(S))."""
    ordered = check_members(members)
    n = len(ordered)
    game = _Game(value, duplicates, known or {})
    empty, full = game(frozenset()), game(frozenset(ordered))
    phi = np.zeros((n, empty.shape[0]))
    for i, m in enumerate(ordered):
        others = ordered[:i] + ordered[i + 1 :]
        for size in range(n):
            # weight of a coalition of `size` others: size! (n - size - 1)! / n!
            w = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for rest in combinations(others, size):
                s = frozenset(rest)
                phi[i] += w * (game(s | {m}) - game(s))
    return _estimate(
        game, ordered, phi, full - empty, permutations=0, converged=True, truncated=False
    )


def gtg_shapley(
    members: Sequence[str],
    value: ValueFn,
    *,
    rng: random.Random,
    max_permutations: int = 200,
    truncation: float = 0.01,
    convergence: float = 0.02,
    round_truncation: float = 1e-5,
    duplicates: Sequence[tuple[str, str]] = (),
    known: Mapping[Coalition, float | Valuation] | None = None,
) -> ShapleyEstimate:
    """GTG-Shapley estimate of each member's value in one round.

    - round_truncation: if |v(all) - v(empty)| <= this (absolute, nats), everybody gets 0.
    - truncation: within a permutation, once |v(all) - v(prefix)| < truncation x |v(all) - v(empty)|
      the remaining members' marginals are 0 and their coalitions are not evaluated.
    - guided sampling: permutation k starts with member k mod n (members in name order), the rest
      shuffled by `rng`, so a cycle of n permutations measures everybody alone once.
    - convergence: checked after each full cycle of n permutations (at least two); stop when
      every member's Monte-Carlo standard error (std of its sampled marginals / sqrt(k)) is at
      most convergence x |v(all) - v(empty)|. (The paper watches the running means' relative
      change, which shrinks like 1/k whatever the accuracy; the standard error does not.)
    - duplicates: pairs from `duplicate_members`; each cluster counts once in every coalition.
    - known: values the caller already has (typically v(all) from the applied round and
      v(empty) = 0), used without calling `value` and not counted in `value_calls`.
    Per-domain values (when `value` returns `Valuation`) follow the same permutations and
    truncation, which is decided on the overall value.
    """
    if max_permutations < 1:
        raise ContributionError(f"max_permutations must be >= 1, got {max_permutations}")
    ordered = check_members(members)
    n = len(ordered)
    game = _Game(value, duplicates, known or {})
    empty, full = game(frozenset()), game(frozenset(ordered))
    total = full - empty
    scale = abs(float(total[0]))
    phi = np.zeros((n, empty.shape[0]))
    if n == 0 or scale <= round_truncation:
        return _estimate(game, ordered, phi, total, permutations=0, converged=True, truncated=True)

    index = {m: i for i, m in enumerate(ordered)}
    squares = np.zeros(n)  # running mean of squared overall marginals, for the standard error
    converged = False
    k = 0
    while k < max_permutations:
        first = ordered[k % n]
        rest = [m for m in ordered if m != first]
        rng.shuffle(rest)
        k += 1
        prefix: frozenset[str] = frozenset()
        previous = empty
        marginals = np.zeros_like(phi)  # (n, 1 + domains)
        for m in [first, *rest]:
            if abs(float(full[0] - previous[0])) < truncation * scale:
                break  # the rest of this permutation adds ~nothing: marginals stay 0
            prefix = prefix | {m}
            current = game(prefix)
            marginals[index[m]] = current - previous
            previous = current
        phi += (marginals - phi) / k  # running means over permutations
        squares += (marginals[:, 0] ** 2 - squares) / k
        if k % n == 0 and k >= 2 * n:
            stderr = np.sqrt(np.maximum(squares - phi[:, 0] ** 2, 0.0) / (k - 1))
            if float(np.max(stderr)) <= convergence * scale:
                converged = True
                break
    return _estimate(
        game, ordered, phi, total, permutations=k, converged=converged, truncated=False
    )
