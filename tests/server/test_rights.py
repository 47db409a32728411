"""Usage rights: policy parsing, shares from ledger scores, tiers at their boundaries, quota
splitting, determinism, and the `fedmoe rights` command."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedmoe.ledger_cmd import rights_command
from server.ledger import Ledger, OperatorKey, Record
from server.rights import (
    Entitlement,
    Policy,
    PolicyError,
    entitlements,
    load_policy,
    parse_policy,
    shares_from_ledger,
    split_quota,
    statement,
    tier_of,
)

EXAMPLE = """
[policy]
min_share = 0.02          # below this a member is a free rider: base model only
latest_share = 0.10       # at/above: may pull the latest release
delay_rounds = 2
quota_tokens_per_period = 1_000_000
period_days = 30
negative_rule = "clip"
"""


def rec(rnd: int, member: str, score: float, kind: str = "contribution") -> Record:
    return Record(rnd, member, score, 0.0, 100, 1, 1, None, "cd" * 32, "2025-01-01T00:00:00Z", kind)


# ---------------------------------------------------------------- policy


def test_example_policy_parses() -> None:
    assert parse_policy(EXAMPLE) == Policy(0.02, 0.10, 2, 1_000_000, 30, "clip")
    assert parse_policy("[policy]\n") == Policy()  # every key has a documented default


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("min_share = 'a lot'", "policy.min_share"),
        ("min_share = -0.1", "policy.min_share"),
        ("latest_share = 1.5", "policy.latest_share"),
        ("min_share = 0.5", "policy.min_share"),  # above latest_share
        ("delay_rounds = -1", "policy.delay_rounds"),
        ("delay_rounds = 1.5", "policy.delay_rounds"),
        ("quota_tokens_per_period = true", "policy.quota_tokens_per_period"),
        ("period_days = 0", "policy.period_days"),
        ("negative_rule = 'keep'", "policy.negative_rule"),
        ("min_shares = 0.1", "policy.min_shares"),  # a typo is not silently a default
    ],
)
def test_bad_policy_names_the_key(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[policy]\n{line}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key} ") and "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[policy\n", "not valid TOML"),
        ("x = 1\n", "unknown table or key 'x'"),
        ("", "missing the [policy] table"),
    ],
)
def test_bad_policy_documents(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(text, "p.toml")


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "none.toml")


# ---------------------------------------------------------------- shares


def test_shares_clip_negative_rounds_and_normalize() -> None:
    records = [rec(1, "a", 3.0), rec(1, "b", 1.0), rec(1, "c", -5.0), rec(2, "a", -10.0), rec(2, "b", 4.0),
               rec(2, "c", -1.0), rec(2, "a", 99.0, kind="penalty")]  # fmt: skip
    shares = shares_from_ledger(records)
    assert shares == {"a": 3.0 / 8.0, "b": 5.0 / 8.0, "c": 0.0}  # a's bad round 2 costs it nothing
    assert list(shares) == ["a", "b", "c"]


def shared(rnd: int, member: str, share: float) -> Record:
    return Record(rnd, member, 0.0, share, 0, 0, 0, None, "cd" * 32, "2025-01-01T00:00:00Z", "share")


def test_rights_use_the_credited_shares_the_last_round_recorded_not_a_re_sum_of_raw_scores() -> None:
    """Secure mode after a short run: raw per-round estimates are positive, nobody is credited
    yet (every recorded share 0), so nobody may use more than the base."""
    raw = [rec(1, "a", 0.3), rec(1, "b", 0.1), rec(2, "a", 0.2), rec(2, "c", 0.4)]
    uncredited = [shared(1, m, 0.0) for m in "ab"] + [shared(2, m, 0.0) for m in "abc"]
    assert shares_from_ledger(raw) == {"a": 0.5, "b": 0.1, "c": 0.4}  # what rights used to say
    assert shares_from_ledger(raw + uncredited) == {"a": 0.0, "b": 0.0, "c": 0.0}
    rights = entitlements(parse_policy(EXAMPLE), raw + uncredited, 2)
    assert {e.tier for e in rights.values()} == {"base-only"} and not any(e.quota_tokens for e in rights.values())
    # once credited, the latest round's shares are the answer, whatever earlier rounds said
    credited = uncredited + [shared(3, "a", 0.75), shared(3, "b", 0.0), shared(3, "c", 0.25)]
    assert shares_from_ledger(raw + credited) == {"a": 0.75, "b": 0.0, "c": 0.25}


def test_all_zero_scores_give_all_zero_shares() -> None:
    assert shares_from_ledger([rec(1, "a", 0.0), rec(1, "b", -1.0)]) == {"a": 0.0, "b": 0.0}
    assert shares_from_ledger([]) == {}


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(-10, 10)), min_size=1, max_size=40),
    st.randoms(),
)
def test_shares_are_deterministic_and_sum_to_one(
    pairs: list[tuple[str, float]], rnd: random.Random
) -> None:
    records = [rec(i, m, s) for i, (m, s) in enumerate(pairs)]
    shares = shares_from_ledger(records)
    shuffled = list(records)
    rnd.shuffle(shuffled)
    assert shares_from_ledger(shuffled) == shares
    assert all(s >= 0 for s in shares.values())
    total = sum(shares.values())
    assert total == 0 or abs(total - 1) < 1e-9


# ---------------------------------------------------------------- tiers and pulls


def test_tiers_at_the_boundaries() -> None:
    policy = Policy(min_share=0.02, latest_share=0.10)
    assert tier_of(0.10, policy) == "latest"
    assert tier_of(0.0999999, policy) == "delayed"
    assert tier_of(0.02, policy) == "delayed"
    assert tier_of(0.0199999, policy) == "base-only"
    assert tier_of(0.0, policy) == "base-only"


def test_entitlements_from_the_ledger() -> None:
    # shares exactly 0.88, 0.10 (latest, on the boundary), 0.02 (delayed, on the boundary), 0
    records = [rec(1, "big", 80.0), rec(1, "edge", 10.0), rec(1, "small", 2.0), rec(1, "rider", -3.0),
               rec(2, "big", 8.0), rec(2, "rider", 0.0)]  # fmt: skip
    ents = entitlements(parse_policy(EXAMPLE), records, latest_round=7)
    assert {m: e.tier for m, e in ents.items()} == {
        "big": "latest", "edge": "latest", "small": "delayed", "rider": "base-only",
    }  # fmt: skip
    big, edge, small, rider = ents["big"], ents["edge"], ents["small"], ents["rider"]
    assert edge.share == 0.10 and small.share == 0.02
    assert big.may_pull(7, 7) and edge.may_pull(7, 7) and not edge.may_pull(8, 7)
    assert small.max_release_round(7) == 5
    assert small.may_pull(5, 7) and not small.may_pull(6, 7) and not small.may_pull(7, 7)
    assert small.max_release_round(1) is None and not small.may_pull(0, 1)
    assert rider.max_release_round(7) is None and not any(rider.may_pull(r, 7) for r in range(8))
    # the quota is split among the entitled by share: 88 : 10 : 2, and the free rider gets nothing
    assert (big.quota_tokens, edge.quota_tokens, small.quota_tokens, rider.quota_tokens) == (
        880_000,
        100_000,
        20_000,
        0,
    )


def test_free_rider_below_min_share_gets_base_only_and_no_quota() -> None:
    records = [rec(1, "worker", 99.0), rec(1, "rider", 1.0)]  # share 0.01 < 0.02
    ents = entitlements(Policy(), records, latest_round=3)
    assert ents["rider"].tier == "base-only" and ents["rider"].quota_tokens == 0
    assert ents["worker"].quota_tokens == Policy().quota_tokens_per_period
    assert "base model only" in statement(ents["rider"])


def test_quota_rounding_sums_exactly_to_the_total() -> None:
    assert split_quota({"a": 1.0, "b": 1.0, "c": 1.0}, 100) == {
        "a": 34,
        "b": 33,
        "c": 33,
    }  # tie: first name
    assert split_quota({"a": 0.0, "b": 0.0}, 100) == {"a": 0, "b": 0}
    assert split_quota({}, 100) == {}


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.floats(0, 1), min_size=1, max_size=12),
       st.integers(0, 10**9))  # fmt: skip
def test_quota_is_proportional_and_sums_to_total(shares: dict[str, float], total: int) -> None:
    quota = split_quota(shares, total)
    weight = sum(shares.values())
    if weight == 0:
        assert set(quota.values()) <= {0}
        return
    assert sum(quota.values()) == total
    for member, share in shares.items():
        assert abs(quota[member] - total * share / weight) < 1 + 1e-6 * total


def test_entitlements_are_deterministic() -> None:
    records = [
        rec(r, m, random.Random(r * 31 + ord(m)).uniform(-1, 2))
        for r in range(20)
        for m in "abcdefg"
    ]
    first = entitlements(Policy(), records, 19)
    assert entitlements(Policy(), list(reversed(records)), 19) == first
    assert [statement(e) for e in first.values()] == [
        statement(e) for e in entitlements(Policy(), records, 19).values()
    ]
    assert sum(e.quota_tokens for e in first.values()) == Policy().quota_tokens_per_period


def test_statement_reads_like_a_sentence() -> None:
    ent = Entitlement("acme", 0.05, "delayed", 50_000, 30, 2, 7)
    assert statement(ent) == (
        "acme: 5.00% of the consortium's contribution as of round 7. May pull releases at least 2 rounds"
        " old (now up to round 5). Quota: 50,000 tokens per 30 days."
    )


# ---------------------------------------------------------------- `fedmoe rights`


def test_rights_command_prints_each_statement(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with Ledger(ledger, OperatorKey.load_or_create(tmp_path / "op.pem")) as book:
        book.append_round([rec(1, "acme", 9.0), rec(1, "globex", 1.0)])
        book.append_round([rec(2, "acme", 9.0), rec(2, "globex", 1.0)])
    policy = tmp_path / "policy.toml"
    policy.write_text(EXAMPLE)
    app = typer.Typer()
    app.command("rights")(rights_command)
    result = CliRunner().invoke(app, ["--ledger", str(ledger), "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    assert "acme: 90.00% of the consortium's contribution as of round 2" in result.output
    assert "globex: 10.00%" in result.output and "900,000 tokens" in result.output
    policy.write_text("[policy]\nperiod_days = 'monthly'\n")
    result = CliRunner().invoke(app, ["--ledger", str(ledger), "--policy", str(policy)])
    assert result.exit_code == 1 and "policy.period_days" in result.output
