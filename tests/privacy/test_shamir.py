"""Shamir t-of-n sharing: every t-subset reconstructs, fewer do not, tampering is caught."""

from __future__ import annotations

import hashlib
import itertools
import random
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.shamir import PRIME, SHARE_BYTES, ShamirError, Share, combine, split


def test_every_threshold_subset_reconstructs_and_smaller_ones_do_not() -> None:
    secret = secrets.token_bytes(32)
    n, t = 6, 3
    shares = split(secret, t, range(1, n + 1))
    for size in range(t, n + 1):
        for subset in itertools.combinations(shares, size):
            assert combine(subset, t) == secret
    for subset in itertools.combinations(shares, t - 1):
        with pytest.raises(ShamirError, match="2 shares given, 3 needed"):
            combine(subset, t)
        # pretending the threshold is lower interpolates the wrong polynomial
        try:
            assert combine(subset, t - 1) != secret
        except ShamirError:
            pass  # no 32-byte secret at all: also not the secret


def test_tampered_share_fails_the_commitment() -> None:
    secret = secrets.token_bytes(32)
    commitment = hashlib.sha256(secret).digest()
    shares = split(secret, 3, [1, 2, 3, 4])
    bad = Share(shares[1].x, (shares[1].y + 1) % PRIME)
    for subset in ([shares[0], bad, shares[2]], [shares[0], bad, shares[2], shares[3]]):
        try:
            recovered = combine(subset, 3)
        except ShamirError:
            continue
        assert hashlib.sha256(recovered).digest() != commitment


def test_refusals() -> None:
    secret = bytes(32)
    shares = split(secret, 2, [1, 2, 3])
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[0]], 2)
    with pytest.raises(ShamirError, match="not distinct"):
        split(secret, 2, [1, 1, 2])
    with pytest.raises(ShamirError, match="threshold 4"):
        split(secret, 4, [1, 2, 3])
    with pytest.raises(ShamirError, match="expected 32"):
        split(b"short", 1, [1])
    with pytest.raises(ShamirError, match="1..65535"):
        split(secret, 1, [0, 1])


def test_share_bytes_round_trip() -> None:
    share = split(secrets.token_bytes(32), 2, [7, 9])[0]
    data = share.to_bytes()
    assert len(data) == SHARE_BYTES and Share.from_bytes(data) == share
    with pytest.raises(ShamirError):
        Share.from_bytes(data[:-1])
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00\x00" + data[2:])  # x = 0 would be the secret itself


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 12), st.data())
def test_random_secrets_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**32))
    xs = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True))
    shares = split(secret, t, xs, random.Random(seed))
    subset = data.draw(st.permutations(shares)).copy()[: data.draw(st.integers(t, n))]
    assert combine(subset, t) == secret
    if t > 1:  # t-1 shares with a lowered threshold give a different value
        try:
            assert combine(subset[: t - 1], t - 1) != secret
        except ShamirError:
            pass
