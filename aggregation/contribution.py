"""Contribution scoring: what each member's update is worth, measured on held-out validation loss.

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

Secure mode (the server sees only sums):
  `random_groups` splits a round's members into disjoint random groups of at least `min_group`;
  each group is securely aggregated on its own, so the server learns one sum per group. Any union
  of groups can then be valued, so `group_shapley` gives each group its Shapley value among the
  round's groups, and `GroupValueEstimator` recovers per-member values across rounds by
  regularized least squares over the group-membership design matrix: rounds with different
  random groups make the members separable. A consortium of fewer than 2 x min_group members
  cannot be split into two groups; `rotating_subsets` then picks one group of min_group members
  per round from a balanced schedule (every subset once per block, so members and pairs are
  observed equally often), and the others sit the round out. The estimator credits a member
  only when its estimate stands `significance` standard errors above zero (see its docstring):
  group sums are noisy, and without the rule a free rider that happens to share groups with
  good members collects part of their value.

  Privacy trade-off. A group's sum is exactly what plain secure aggregation reveals for the whole
  round, but over fewer people: the smaller the group, the more the sum says about each member's
  update. A group of one reveals that member's update outright; in a group of two, each member
  can subtract its own update and learn the other's. `min_group` (default 3) is therefore a
  privacy parameter, and with fewer than `min_group` members the round is one group of everybody
  (with a single member that "sum" is its update -- no worse than the round without grouping, but
  not private). Groups within a round are disjoint: differences of overlapping sums would expose
  individuals. The secure-aggregation layer must also refuse to unmask a group whose survivors
  after dropouts fall below `min_group`. Across rounds, recovering individual values is by design
  a quality inference attack on secure aggregation (Pejo, Biczok, Acs, "Quality Inference in
  Federated Learning with Secure Aggregation", IEEE Trans. Big Data 2023): what leaks is one
  scalar per member (how much its updates helped), never its updates -- each round's updates are
  new, so sums from different rounds do not combine into an individual update.

Shares: `ScoreBook` accumulates per-round scores into contribution shares. A negative round score
is clipped to zero before it is added (a member that hurt the model earns nothing that round; it
does not go into debt), shares are totals over their sum, and when nobody has earned anything all
shares are zero. Totals are the value delivered, in nats of validation loss, so a round that
improved the model a lot weighs more than one that barely moved it.

Free-riding defences (pure helpers over update tensors, open mode only):
  `is_null_update` flags a zero update or one that replays the global state instead of a delta.
  `duplicate_members` flags pairs whose flattened updates point the same way (cosine >= threshold):
  a copy of another member's update, or of its data. Treatment: pass the pairs to `gtg_shapley`
  as `duplicates=`; every coalition is then evaluated with each flagged cluster counted once (only
  its first member, by name, is kept), so adding a copy to a coalition that already holds its
  original adds nothing and Shapley splits the cluster's value equally among its members.
  Copying never creates value, it can only share the original's. Within one round nobody can
  tell the original from the copy; the pairs are returned so the operator's policy (and the
  ledger) can act on them. Stale copies (a member replaying an earlier round's update, its own or
  someone else's) are found the same way by passing last round's updates under other names.
  Noise updates need no rule: their Shapley value is about zero or negative, and clipped to zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import combinations, pairwise

import numpy as np
import numpy.typing as npt
import torch

Coalition = frozenset[str]
FloatArray = npt.NDArray[np.float64]
_MAX_SCHEDULE = 1024  # subsets enumerated by rotating_subsets; beyond, random ones


class ContributionError(ValueError):
    """Inputs that cannot be scored (duplicate member ids, non-finite values, a round recorded twice)."""


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


def _check_members(members: Sequence[str]) -> list[str]:
    ordered = sorted(members)
    for a, b in pairwise(ordered):
        if a == b:
            raise ContributionError(f"member {a!r} appears twice")
    return ordered


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
    ordered = _check_members(members)
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
    ordered = _check_members(members)
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


# ----------------------------------------------------------------------------- secure mode


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
    ordered = _check_members(members)
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
    ordered = _check_members(members)
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


@dataclass(frozen=True)
class GroupValueEstimator:
    """Per-member values recovered from group values observed over rounds.

    Model: each observed group value y_g = (1 + b t_g) sum_{i in g} x_i + noise, with x_i a
    member's contribution per round at the middle of the run and t_g the round's place in the
    run, centred and scaled to [-1/2, 1/2]. With `trend`, b is a common drift fitted alongside:
    every member's updates are worth proportionally less (or more) as the model converges.
    Without it whoever happened to sit in the early groups would be credited with the early
    rounds' larger gains; and a drift added per member instead of proportionally would pay a
    free rider that joins late. Estimate: alternating least squares (x by a ridge-regularized
    linear solve, x >= 0 when `nonnegative`; then b in closed form), A the 0/1 group-membership
    matrix (one row per observed group, one column per member ever observed). The ridge term
    makes the problem well-posed before the groups have separated everybody: members never
    seen apart get equal shares of their joint value.

    Credit rule (`credited`, `totals`): a member is credited with its estimate only when the
    estimate is at least `significance` standard errors above zero, the errors from the
    residual variance of the fit (sigma^2 (J'J + ridge)^-1, J the model's Jacobian). Group sums are noisy (every
    round's updates differ), so a free rider grouped with useful members gets a small positive
    estimate about half the time; the rule gives it nothing unless the data say otherwise. Until
    there are more observations than unknowns the residual variance is unknown and nobody is
    credited; members the groups do not identify (e.g. always seen together, as in a consortium
    too small to split) are never credited, since nothing tells their contributions apart. The
    price: a genuinely small contributor earns nothing until enough rounds make its value
    distinguishable from zero (its standard error shrinks like 1/sqrt(rounds)).
    """

    ridge: float = 1e-3
    nonnegative: bool = True
    significance: float = 2.0
    trend: bool = True
    observations: tuple[tuple[frozenset[str], float], ...] = ()
    rounds: tuple[int, ...] = ()  # each observation's round ordinal (0, 1, ...)

    def observe(self, group_values: Mapping[frozenset[str], float]) -> GroupValueEstimator:
        """A new estimator with one round's (disjoint) groups and their values added."""
        seen: set[str] = set()
        added: list[tuple[frozenset[str], float]] = []
        for group, v in sorted(group_values.items(), key=lambda gv: sorted(gv[0])):
            if not group:
                raise ContributionError("an observed group is empty")
            if seen & group:
                raise ContributionError(f"groups of one round overlap on {sorted(seen & group)}")
            if not math.isfinite(v):
                raise ContributionError(f"group {sorted(group)} has non-finite value {v}")
            seen |= group
            added.append((group, float(v)))
        ordinal = self.rounds[-1] + 1 if self.rounds else 0
        return replace(self, observations=self.observations + tuple(added), rounds=self.rounds + (ordinal,) * len(added))

    def members(self) -> list[str]:
        return sorted({m for group, _ in self.observations for m in group})

    def participation(self) -> dict[str, int]:
        """How many observed groups (= rounds) each member was in."""
        counts: dict[str, int] = {}
        for group, _ in self.observations:
            for m in group:
                counts[m] = counts.get(m, 0) + 1
        return dict(sorted(counts.items()))

    def _design(self) -> tuple[list[str], FloatArray, FloatArray, FloatArray]:
        """(members, A, y, t): membership matrix, group values, each group's place in the run."""
        members = self.members()
        col = {m: j for j, m in enumerate(members)}
        a = np.zeros((len(self.observations), len(members)))  # (groups, members)
        y = np.array([v for _, v in self.observations])  # (groups,)
        for r, (group, _) in enumerate(self.observations):
            for m in group:
                a[r, col[m]] = 1.0
        last = self.rounds[-1] if self.rounds else 0
        t = (np.array(self.rounds, dtype=np.float64) - last / 2) / max(last, 1)  # in [-1/2, 1/2]
        return members, a, y, t if self.trend else np.zeros_like(y)

    @cached_property
    def _fit(self) -> tuple[list[str], FloatArray, FloatArray, float, FloatArray]:
        """(members, x, J, b, residual) of y = (1 + b t) * A x by alternating least squares; J is
        the Jacobian [A (1 + b t), (A x) t] the standard errors come from. Computed once per
        estimator (estimators are immutable: `observe` returns a new one)."""
        members, a, y, t = self._design()
        b = 0.0
        for _ in range(200):
            aw = a * (1.0 + b * t)[:, None]
            q = aw.T @ aw + self.ridge * np.eye(len(members))
            c = aw.T @ y
            x = np.linalg.solve(q, c)
            if self.nonnegative:
                x = _nonnegative_quadratic(q, c, np.maximum(x, 0.0))
            if not self.trend:
                break
            u = (a @ x) * t
            # |b| < 2 keeps every round's factor 1 + b t positive (t is within [-1/2, 1/2])
            new = float(np.clip(u @ (y - a @ x) / (u @ u + self.ridge), -1.9, 1.9))
            if abs(new - b) <= 1e-12 * max(1.0, abs(b)):
                b = new
                break
            b = new
        jacobian = a * (1.0 + b * t)[:, None]
        if self.trend:
            jacobian = np.hstack([jacobian, ((a @ x) * t)[:, None]])
        residual = y - (1.0 + b * t) * (a @ x)
        return members, x, jacobian, b, residual

    def estimate(self) -> dict[str, float]:
        """Each member's estimated contribution per round, at the middle of the run."""
        if not self.observations:
            return {}
        members, x, *_ = self._fit
        return {m: float(x[j]) for j, m in enumerate(members)}

    def drift(self) -> float:
        """b: a round at place t of the run (-1/2 first, +1/2 last) is worth (1 + b t) x."""
        return self._fit[3] if self.observations else 0.0

    def standard_errors(self) -> dict[str, float]:
        """Each estimate's standard error (inf while there are no more observations than unknowns)."""
        if not self.observations:
            return {}
        members, _, jacobian, _, residual = self._fit
        dof = len(residual) - jacobian.shape[1]
        if dof < 1:
            return {m: math.inf for m in members}
        variance = float(residual @ residual) / dof
        q = jacobian.T @ jacobian + self.ridge * np.eye(jacobian.shape[1])
        spread = np.sqrt(np.maximum(np.diag(np.linalg.inv(q)), 0.0) * variance)
        # A member is identifiable when its unit vector lies in J's row space (no combination of
        # the other unknowns explains its groups as well); otherwise only the ridge holds its
        # estimate in place, and its error is unbounded.
        _, singular, vt = np.linalg.svd(jacobian)
        rank = int(np.sum(singular > 1e-9 * max(float(singular[0]), 1.0))) if singular.size else 0
        unidentified = np.sum(vt[rank:] ** 2, axis=0) > 1e-9  # (unknowns,) weight in J's null space
        return {m: math.inf if unidentified[j] else float(spread[j]) for j, m in enumerate(members)}

    def credited(self) -> dict[str, float]:
        """The estimates the credit rule lets stand (the others are 0); see the class docstring."""
        estimate, errors = self.estimate(), self.standard_errors()
        bar = {m: self.significance * errors[m] if self.significance else 0.0 for m in estimate}
        return {m: v if v > bar[m] else 0.0 for m, v in estimate.items()}

    def totals(self) -> dict[str, float]:
        """Credited value delivered over the rounds each member took part in: its credited
        estimate times (1 + b t) summed over its groups (a late joiner's rounds are worth what
        late rounds are worth)."""
        credited = self.credited()
        if not credited:
            return {}
        members, _, _, t = self._design()
        factor = 1.0 + self.drift() * t  # (groups,)
        totals = dict.fromkeys(members, 0.0)
        for (group, _), f in zip(self.observations, factor, strict=True):
            for m in group:
                totals[m] += credited[m] * float(f)
        return totals


def _nonnegative_quadratic(
    q: FloatArray, c: FloatArray, x: FloatArray, *, tol: float = 1e-12, max_sweeps: int = 10_000
) -> FloatArray:
    """argmin_{x >= 0} x'Qx/2 - c'x for positive definite Q, by projected coordinate descent."""
    x = x.copy()
    scale = max(float(np.max(np.abs(c))), 1e-300)
    for _ in range(max_sweeps):
        largest = 0.0
        for i in range(len(x)):
            new = max(0.0, x[i] + (c[i] - float(q[i] @ x)) / q[i, i])
            largest = max(largest, abs(new - x[i]))
            x[i] = new
        if largest <= tol * scale:
            break
    return x


# ----------------------------------------------------------------------------- shares


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
    """Per-member value delivered, accumulated over rounds (negative round scores count as 0)."""

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
            totals[member] = totals.get(member, 0.0) + max(0.0, float(score))
        return ScoreBook(dict(sorted(totals.items())), self.rounds + (server_round,))

    def shares(self) -> dict[str, float]:
        return contribution_shares(self.totals)


# ----------------------------------------------------------------------------- defences


def _norm(update: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(
        math.fsum(float(t.detach().to(torch.float64).square().sum()) for t in update.values())
    )


def is_null_update(
    update: Mapping[str, torch.Tensor],
    *,
    rel_tol: float = 1e-6,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> bool:
    """True when `update` (a delta) carries no training.

    With `reference` (the global trainable state the member was sent): null when
    ||update|| <= rel_tol x ||reference|| (no change), or when ||update - reference|| <=
    rel_tol x ||reference|| on the reference's tensors (the global state sent back as if it were
    a delta). Without a reference only updates with ||update|| <= rel_tol are null. An update with
    no tensors is null.
    """
    if not update:
        return True
    norm = _norm(update)
    if reference is None:
        return norm <= rel_tol
    ref_norm = _norm(reference)
    if norm <= rel_tol * ref_norm:
        return True
    if set(update) == set(reference):
        replay = {
            k: update[k].detach().to(torch.float64) - reference[k].detach().to(torch.float64)
            for k in update
            if update[k].shape == reference[k].shape
        }
        if len(replay) == len(update) and _norm(replay) <= rel_tol * ref_norm:
            return True
    return False


def duplicate_members(
    updates: Mapping[str, Mapping[str, torch.Tensor]], *, threshold: float = 0.99
) -> list[tuple[str, str]]:
    """Pairs (a, b), a < b, whose flattened updates have cosine similarity >= threshold.

    Tensors are matched by name; a tensor one member did not send counts as zeros for it (members
    train different experts). Zero updates are skipped (no direction; see `is_null_update`).
    """
    members = sorted(updates)
    n = len(members)
    gram = torch.zeros(n, n, dtype=torch.float64)  # (members, members) inner products
    names = sorted({name for u in updates.values() for name in u})
    for name in names:
        holders = [i for i, m in enumerate(members) if name in updates[m]]
        shape = updates[members[holders[0]]][name].shape
        for i in holders:
            if updates[members[i]][name].shape != shape:
                raise ContributionError(
                    f"member {members[i]!r}: tensor {name!r} has shape "
                    f"{tuple(updates[members[i]][name].shape)}, expected {tuple(shape)}"
                )
        rows = torch.stack(
            [updates[members[i]][name].detach().to(torch.float64).reshape(-1) for i in holders]
        )  # (holders, numel)
        idx = torch.tensor(holders)
        gram[idx.unsqueeze(1), idx.unsqueeze(0)] += rows @ rows.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == 0 or norms[j] == 0:
                continue
            if float(gram[i, j] / (norms[i] * norms[j])) >= threshold:
                pairs.append((members[i], members[j]))
    return pairs
