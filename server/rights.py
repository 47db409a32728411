"""Usage rights: a TOML policy turns the ledger's contribution scores into each member's
entitlement (which releases it may pull, and its metered token quota), deterministically.

    [policy]
    min_share = 0.02                      # below: a free rider, base model only, no quota
    latest_share = 0.10                   # at/above: may pull the latest release
    delay_rounds = 2                      # in between: only releases >= this many rounds old
    quota_tokens_per_period = 1_000_000   # split among entitled members by share
    period_days = 30
    negative_rule = "clip"                # old ledgers (no share records): a negative round counts as 0

Every key is optional (the values above are the defaults); unknown keys are refused, so a typo
never silently falls back to a default. The hub enforces `Entitlement.may_pull` on every call.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from server.ledger import Record

DEFAULT_POLICY_TOML = """\
# fedmoe usage-rights policy: contribution shares (from the ledger) -> entitlements
[policy]
min_share = 0.02                      # below: a free rider, base model only, no quota
latest_share = 0.10                   # at/above: may pull the latest release
delay_rounds = 2                      # in between: only releases >= this many rounds old
quota_tokens_per_period = 1_000_000   # split among entitled members by share
period_days = 30
negative_rule = "clip"                # old ledgers (no share records): a negative round counts as 0
probation_rounds = 3                  # after this many rounds under min_share: no longer sampled (0: never)
"""

Tier = Literal["latest", "delayed", "base-only"]
NEGATIVE_RULES = ("clip",)
CONTRIBUTION = "contribution"  # one member's line for a round it took part in
SHARE = "share"  # one member's credited cumulative share as of a round (every member known)


class PolicyError(ValueError):
    """The usage-rights policy file is missing, not TOML, or has a bad key."""


@dataclass(frozen=True)
class Policy:
    min_share: float = 0.02
    latest_share: float = 0.10
    delay_rounds: int = 2
    quota_tokens_per_period: int = 1_000_000
    period_days: int = 30
    negative_rule: str = "clip"
    probation_rounds: int = 3  # rounds taken part in under min_share, after which a member is not sampled

    def __post_init__(self) -> None:
        _check({f.name: getattr(self, f.name) for f in fields(self)}, "policy")


def _check(values: Mapping[str, Any], source: str) -> None:
    def fail(key: str, why: str) -> PolicyError:
        return PolicyError(f"{source}: policy.{key} {why}, got {values[key]!r}")

    for key in ("min_share", "latest_share"):
        value = values[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise fail(key, "must be a number from 0 to 1")
    if values["min_share"] > values["latest_share"]:
        raise fail("min_share", f"must not exceed latest_share ({values['latest_share']!r})")
    for key, low in (("delay_rounds", 0), ("quota_tokens_per_period", 0), ("period_days", 1), ("probation_rounds", 0)):
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise fail(key, f"must be an integer >= {low}")
    if values["negative_rule"] not in NEGATIVE_RULES:
        raise fail("negative_rule", f"must be one of {list(NEGATIVE_RULES)}")


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse and validate a policy document; errors name `source` and the offending key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML ({exc})") from None
    extra = sorted(set(document) - {"policy"})
    if extra:
        raise PolicyError(f"{source}: unknown table or key {extra[0]!r} (expected only [policy])")
    table: Any = document.get("policy")
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: missing the [policy] table")
    known = [f.name for f in fields(Policy)]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PolicyError(
            f"{source}: policy.{unknown[0]} is not a policy key (known: {', '.join(known)})"
        )
    values = {f.name: table.get(f.name, f.default) for f in fields(Policy)}
    _check(values, source)
    return Policy(**values)


def load_policy(path: Path) -> Policy:
    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file")
    return parse_policy(path.read_text(encoding="utf-8"), str(path))


def shares_from_ledger(records: Iterable[Record], negative_rule: str = "clip") -> dict[str, float]:
    """Each member's credited contribution share, exactly as the rounds recorded it.

    Every committed round records, as records of kind "share", the credited cumulative share of
    every member known so far (server/rounds.py, record_in_ledger): the latest round's are the
    answer, so rights follow the credit rule (in secure mode, only estimates that stand out from
    the noise), never a re-sum of raw per-round estimates. A ledger written before share records
    existed falls back to summing its "contribution" scores: "clip" counts each per-round score
    below zero as zero. Sums are exact (math.fsum) and members sorted, so the result does not
    depend on record order.
    """
    if negative_rule not in NEGATIVE_RULES:
        raise PolicyError(f"negative_rule {negative_rule!r} is not one of {list(NEGATIVE_RULES)}")
    records = list(records)
    recorded = [r for r in records if r.kind == SHARE]
    if recorded:
        last = max(r.round for r in recorded)
        return {r.member: r.share for r in sorted(recorded, key=lambda r: r.member) if r.round == last}
    clipped: dict[str, list[float]] = {}
    for record in records:
        if record.kind == CONTRIBUTION:
            clipped.setdefault(record.member, []).append(max(record.score, 0.0))
    totals = {member: math.fsum(clipped[member]) for member in sorted(clipped)}
    grand = math.fsum(totals.values())
    if grand <= 0:
        return {member: 0.0 for member in totals}
    return {member: total / grand for member, total in totals.items()}


def past_probation(policy: Policy, records: Iterable[Record], *, secure: bool = False) -> set[str]:
    """Members no longer sampled: taking part in a round is an entitlement too (it hands over the
    newest trainable state). A member that has taken part in `probation_rounds` rounds and whose
    credited share is still under `min_share` sits out, but only while someone else is credited:
    before any estimate stands out nobody is judged.

    Not under secure contribution (`secure`): there a share of 0 says only that the group sums do
    not yet tell the member's value from zero, which for most honest members takes far more than
    a few rounds; the first member credited would send every other one away (measured on the demo:
    round 9 planned a group of one and the run stopped). The credit rule already pays such a
    member nothing."""
    if policy.probation_rounds == 0 or secure:
        return set()
    records = list(records)
    shares = shares_from_ledger(records, policy.negative_rule)
    if not any(s >= policy.min_share for s in shares.values()):
        return set()
    taken: dict[str, int] = {}
    for record in records:
        if record.kind == CONTRIBUTION:
            taken[record.member] = taken.get(record.member, 0) + 1
    return {m for m, s in shares.items() if s < policy.min_share and taken.get(m, 0) >= policy.probation_rounds}


@dataclass(frozen=True)
class Entitlement:
    member: str
    share: float
    tier: Tier
    quota_tokens: int  # per period
    period_days: int
    delay_rounds: int
    as_of_round: int  # the latest round of the ledger the entitlement was computed from

    def max_release_round(self, latest_round: int) -> int | None:
        """The newest release round this member may pull now; None: the base model only."""
        if self.tier == "latest":
            return latest_round
        if self.tier == "delayed" and latest_round - self.delay_rounds >= 0:
            return latest_round - self.delay_rounds
        return None

    def may_pull(self, release_round: int, latest_round: int) -> bool:
        newest = self.max_release_round(latest_round)
        return newest is not None and 0 <= release_round <= newest


def tier_of(share: float, policy: Policy) -> Tier:
    if share >= policy.latest_share:
        return "latest"
    if share >= policy.min_share:
        return "delayed"
    return "base-only"


def split_quota(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Split `total` tokens proportional to `shares` into integers that sum to exactly `total`
    (largest remainder: everyone gets the floor of their exact part, and the leftover tokens go
    one each to the largest fractional parts, ties to the alphabetically first member). With
    no positive share nobody gets anything. Exact rational arithmetic, so deterministic."""
    exact = {m: Fraction(s) for m, s in sorted(shares.items()) if s > 0}
    weight = sum(exact.values(), Fraction(0))
    if weight == 0:
        return {m: 0 for m in sorted(shares)}
    parts = {m: total * s / weight for m, s in exact.items()}
    quota = {m: math.floor(p) for m, p in parts.items()}
    leftover = total - sum(quota.values())
    for member in sorted(parts, key=lambda m: (-(parts[m] - quota[m]), m))[:leftover]:
        quota[member] += 1
    return {m: quota.get(m, 0) for m in sorted(shares)}


def entitlements(
    policy: Policy, records: Iterable[Record], latest_round: int
) -> dict[str, Entitlement]:
    """Every member's entitlement from the ledger alone. The quota is split among the members
    at or above min_share, by their shares (free riders get 0 and their part goes to the rest)."""
    shares = shares_from_ledger(records, policy.negative_rule)
    tiers = {m: tier_of(s, policy) for m, s in shares.items()}
    quota = split_quota(
        {m: s for m, s in shares.items() if tiers[m] != "base-only"}, policy.quota_tokens_per_period
    )
    return {
        m: Entitlement(
            member=m,
            share=s,
            tier=tiers[m],
            quota_tokens=quota.get(m, 0),
            period_days=policy.period_days,
            delay_rounds=policy.delay_rounds,
            as_of_round=latest_round,
        )
        for m, s in shares.items()
    }


def statement(ent: Entitlement) -> str:
    """One member's entitlement in words."""
    head = f"{ent.member}: {ent.share:.2%} of the consortium's contribution as of round {ent.as_of_round}."
    if ent.tier == "latest":
        pulls = "May pull every release, including the latest."
    elif ent.tier == "delayed":
        newest = ent.max_release_round(ent.as_of_round)
        now = "none yet" if newest is None else f"now up to round {newest}"
        pulls = f"May pull releases at least {ent.delay_rounds} rounds old ({now})."
    else:
        pulls = "Below the minimum share: the base model only, no releases."
    return f"{head} {pulls} Quota: {ent.quota_tokens:,} tokens per {ent.period_days} days."
