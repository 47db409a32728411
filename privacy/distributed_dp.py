"""Member-level differential privacy under secure aggregation: distributed Skellam noise.

Every member adds its share of integer noise to its ring input before masking; the operator
unmasks only sums, and every sum it can unmask carries at least the target noise, while no single
member's share is enough for any guarantee. Skellam noise (Agarwal, Kairouz and Liu, "The Skellam
Mechanism for Differentially Private Federated Learning", NeurIPS 2021) is the difference of two
Poisson draws; a sum of independent Skellam draws is Skellam again, with the variances adding up,
so shares compose exactly (a distributed discrete Gaussian, Kairouz et al. 2021, only
approximately). Sampling is torch's Poisson; (ε, δ) comes from the Skellam mechanism's Rényi DP
bound (Theorem 3.5 of that paper, hand-written: no library carries it) composed over rounds and
converted with opacus's RDP-to-(ε, δ) conversion.

Shares and dropouts: a group's sum is unmasked only with at least `threshold` survivors (Shamir),
so each member adds variance sigma^2 / threshold: any sum the operator can unmask has at least
sigma^2, and s survivors give s / threshold times it. A dropout before the mask stage takes its
share with it, which that bound already allows for; with every member present the sum carries
more noise than needed, the price of tolerating dropouts.

Sensitivity, in ring units (the codec's integers): a member's update is clipped to `update_clip`
in L2 and scaled by its weight w <= 1 before quantization with the shared scale
`codec_clip / qmax`; stochastic rounding moves each of the d kept coordinates by less than 1. So
adding or removing one member changes a sum by at most
    Delta_2 = update_clip / scale + sqrt(d)   (L2),   Delta_1 = sqrt(d) * Delta_2   (L1).
The per-expert token counts travel in the same vector without noise: they are not covered (the
operator sees each member's total tokens in its reply anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import brentq

ORDERS = tuple(range(2, 257))  # integer Rényi orders: the Skellam bound is stated for integer alpha


class PrivacyConfigError(ValueError):
    """A member-level DP setting that cannot be met (bad epsilon, delta, clip)."""


@dataclass(frozen=True)
class Sensitivity:
    l2: float
    l1: float

    @classmethod
    def of_update(cls, update_clip: float, scale: float, coordinates: int) -> Sensitivity:
        """What one member can move a sum by, in ring units (module docstring)."""
        if not (update_clip > 0 and scale > 0 and coordinates > 0):
            raise PrivacyConfigError(
                f"member-level DP needs update-clip > 0 and codec-clip > 0 (got {update_clip}, scale {scale})")
        l2 = update_clip / scale + math.sqrt(coordinates)
        return cls(l2=l2, l1=math.sqrt(coordinates) * l2)


def skellam_rdp(alpha: int, sensitivity: Sensitivity, variance: float) -> float:
    """Rényi DP of order `alpha` of one release with Skellam noise of total `variance` (= 2 mu)."""
    mu = variance / 2
    l2, l1 = sensitivity.l2, sensitivity.l1
    return alpha * l2 * l2 / (4 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu))


def epsilon(rounds: int, sensitivity: Sensitivity, variance: float, delta: float) -> float:
    """(ε, δ) of `rounds` releases, each with at least `variance` of Skellam noise."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if rounds <= 0:
        return 0.0
    if variance <= 0:
        return math.inf
    rdp = [rounds * skellam_rdp(a, sensitivity, variance) for a in ORDERS]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def calibrate(target_epsilon: float, delta: float, rounds: int, sensitivity: Sensitivity) -> float:
    """The smallest total noise variance per sum whose `rounds` releases stay within (target ε, δ)."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"dp-member-epsilon {target_epsilon!r} must be a finite number > 0")
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"dp-member-delta {delta!r} must be in (0, 1)")
    if rounds < 1:
        raise PrivacyConfigError(f"member-level DP over {rounds} rounds: need at least one")

    def gap(log_variance: float) -> float:
        return epsilon(rounds, sensitivity, math.exp(log_variance), delta) - target_epsilon

    low, high = math.log(sensitivity.l2 ** 2 * 1e-4), math.log(sensitivity.l2 ** 2 * 1e8)
    if gap(high) > 0:
        raise PrivacyConfigError(f"dp-member-epsilon {target_epsilon} over {rounds} rounds needs more noise than any ring holds")
    return math.exp(brentq(gap, low, high, xtol=1e-6))


def skellam_share(variance: float, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One member's share: `size` int64 draws of Skellam(mu, mu), variance 2 mu = `variance`."""
    if not (math.isfinite(variance) and variance >= 0):
        raise PrivacyConfigError(f"noise variance {variance!r} must be a finite number >= 0")
    if variance == 0 or size == 0:
        return torch.zeros(size, dtype=torch.int64)
    rate = torch.full((size,), variance / 2, dtype=torch.float64)
    return (torch.poisson(rate, generator=generator) - torch.poisson(rate, generator=generator)).to(torch.int64)


def headroom(variance: float, survivors: int, threshold: int) -> int:
    """How far the noise of a sum of `survivors` shares can stray, in ring units: 9 standard
    deviations (a coordinate beyond it: probability under 1e-18 for the Gaussian it approaches)."""
    if variance <= 0:
        return 0
    return math.ceil(9 * math.sqrt(variance * survivors / threshold))
