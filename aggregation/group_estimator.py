"""Secure-mode member values: per-member contributions recovered from group values over rounds.

Each round aggregation/groups.py values the round's disjoint groups (one securely aggregated sum
each); `GroupValueEstimator` fits per-member values to all the group values seen so far, by
regularized least squares over the group-membership design matrix with a common drift term, and
credits a member only when its estimate stands `significance` standard errors above zero (see
its docstring): group sums are noisy, and without the rule a free rider that happens to share
groups with good members collects part of their value.

Across rounds, recovering individual values is by design a quality inference attack on secure
aggregation (Pejo, Biczok, Acs, "Quality Inference in Federated Learning with Secure
Aggregation", IEEE Trans. Big Data 2023): what leaks is one scalar per member (how much its
updates helped), never its updates -- each round's updates are new, so sums from different
rounds do not combine into an individual update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import numpy.typing as npt
from scipy.linalg import LinAlgError, cholesky, solve_triangular
from scipy.optimize import nnls

from aggregation.contribution import ContributionError

FloatArray = npt.NDArray[np.float64]


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

    Split model (`split`, used when most rounds have two or more groups, i.e. a consortium of
    at least 2 x min_group members): each round says only how its value divides between its
    groups, whatever the round was worth (`_share_fit`). Measured on the secure demo (6 members,
    2 groups a round, 10 rounds): the additive model credited 0 of 5 honest members, since round
    values swung from -0.12 to +0.09 with the server optimizer; the split model on the same
    group values credited 2, and with coalitions valued against the momentum-only round
    (server/scoring.py) all 5, the free rider at 0.8 standard errors (not credited).
    """

    ridge: float = 1e-3
    nonnegative: bool = True
    significance: float = 2.0
    trend: bool = True
    split: bool = True  # with rounds of several groups, the split model decides (`uses_shares`)
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
            x = _nonnegative_quadratic(q, c) if self.nonnegative else np.linalg.solve(q, c)
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

    def _share_rounds(self) -> list[int]:
        """The rounds of two or more groups: each says how its value splits between its groups."""
        counts: dict[int, int] = {}
        for r in self.rounds:
            counts[r] = counts.get(r, 0) + 1
        return [r for r in sorted(counts) if counts[r] >= 2]

    @property
    def uses_shares(self) -> bool:
        """Whether the split model (`_share_fit`) decides: at least 3 rounds of two or more
        groups, and those are most of the rounds (a consortium of >= 2 x min_group members)."""
        share_rounds = self._share_rounds()
        return self.split and len(share_rounds) >= 3 and 2 * len(share_rounds) > len(set(self.rounds))

    @cached_property
    def _share_fit(self) -> tuple[list[str], FloatArray, FloatArray, float]:
        """(members, shares s, their standard errors, the mean round value) of the split model.

        In a round of several disjoint groups, group g holds the part sum_{i in g} s_i /
        sum_{i in round} s_i of the round's total value Y_r, whatever Y_r is: y_g sum_{round} s
        - Y_r sum_g s = 0, one linear row per group, with sum s = 1. A round's own scale (the
        optimizer's momentum, how far the model has come, a harmful round) drops out, which the
        additive model can only fit as a linear drift; rows carry the weight of Y_r, so a round
        worth nothing says nothing. Least squares under the constraint: s = M1 / 1'M1 with
        M = (A'A)^-1, errors sigma^2 (M - M11'M / 1'M1) from the residual variance."""
        members = self.members()
        col = {m: j for j, m in enumerate(members)}
        rows: list[FloatArray] = []
        totals: list[float] = []
        for r in self._share_rounds():
            groups = [(g, v) for (g, v), rr in zip(self.observations, self.rounds, strict=True) if rr == r]
            total = sum(v for _, v in groups)
            totals.append(total)
            present = np.zeros(len(members))
            for g, _ in groups:
                present[[col[m] for m in g]] = 1.0
            for g, v in groups:
                row = -v * present
                row[[col[m] for m in g]] += total
                rows.append(row)
        a = np.array(rows)
        gram = a.T @ a
        gram += 1e-9 * max(float(np.trace(gram)), 1e-300) / len(members) * np.eye(len(members))  # numerical jitter
        m_inv = np.linalg.inv(gram)
        ones = np.ones(len(members))
        denominator = float(ones @ m_inv @ ones)
        shares = m_inv @ ones / denominator
        if self.nonnegative and np.any(shares < 0):  # the constraint as a heavy row, under NNLS
            weight = 1e3 * max(float(np.sqrt(np.trace(gram))), 1.0)
            shares = nnls(np.vstack([a, weight * ones]), np.concatenate([np.zeros(len(rows)), [weight]]),
                          maxiter=_NNLS_ITERATIONS * len(members))[0]
        residual = a @ shares
        dof = len(rows) - (len(members) - 1)
        if dof < 1:
            return members, shares, np.full(len(members), math.inf), float(np.mean(totals))
        variance = float(residual @ residual) / dof
        cov = variance * (m_inv - np.outer(m_inv @ ones, ones @ m_inv) / denominator)
        return members, shares, np.sqrt(np.maximum(np.diag(cov), 0.0)), float(np.mean(totals))

    def estimate(self) -> dict[str, float]:
        """Each member's estimated contribution per round, at the middle of the run (with the
        split model: its share of the mean round value)."""
        if not self.observations:
            return {}
        if self.uses_shares:
            members, shares, _, mean_total = self._share_fit
            return {m: float(shares[j] * mean_total) for j, m in enumerate(members)}
        members, x, *_ = self._fit
        return {m: float(x[j]) for j, m in enumerate(members)}

    def drift(self) -> float:
        """b: a round at place t of the run (-1/2 first, +1/2 last) is worth (1 + b t) x."""
        return self._fit[3] if self.observations else 0.0

    def standard_errors(self) -> dict[str, float]:
        """Each estimate's standard error (inf while there are no more observations than unknowns)."""
        if not self.observations:
            return {}
        if self.uses_shares:
            members, _, errors, mean_total = self._share_fit
            return {m: float(errors[j] * abs(mean_total)) for j, m in enumerate(members)}
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
        factor = np.ones_like(t) if self.uses_shares else 1.0 + self.drift() * t  # (groups,)
        totals = dict.fromkeys(members, 0.0)
        for (group, _), f in zip(self.observations, factor, strict=True):
            for m in group:
                totals[m] += credited[m] * float(f)
        return totals


_NNLS_ITERATIONS = 30  # per unknown; scipy's default (3) can stop an active-set solve short


def _nonnegative_quadratic(q: FloatArray, c: FloatArray) -> FloatArray:
    """argmin_{x >= 0} x'Qx/2 - c'x for symmetric positive (semi-)definite Q, by NNLS.

    With Q = R'R and R'd = c, x'Qx/2 - c'x = |Rx - d|^2/2 - |d|^2/2, so the minimizer is
    scipy's nonnegative least squares of (R, d). R is the Cholesky factor while Q is positive
    definite (always for ridge > 0). With ridge = 0 and members never seen apart Q is singular
    and Cholesky fails; then R = W^1/2 V' over the eigenpairs (W, V) of Q's numerical range, and
    d takes c's part in that range. The estimator's c = A'y lies in range(Q), so that is still the
    same problem (its minimizer is no longer unique: NNLS returns one); a ridge added here instead
    would bias every estimate.
    """
    try:
        upper = cholesky(q)  # Q = U'U, U upper triangular
        return nnls(upper, solve_triangular(upper, c, trans="T"), maxiter=_NNLS_ITERATIONS * len(c))[0]
    except LinAlgError:
        w, v = np.linalg.eigh(q)
        kept = w > np.finfo(np.float64).eps * len(w) * max(float(w[-1]), 0.0)
        root = np.sqrt(w[kept])
        return nnls(root[:, None] * v[:, kept].T, (v[:, kept].T @ c) / root, maxiter=_NNLS_ITERATIONS * len(c))[0]
