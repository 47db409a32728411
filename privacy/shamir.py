"""Shamir t-of-n secret sharing of 32-byte secrets, for secure aggregation's dropout recovery.

A secret s (a 32-byte string read as a big-endian integer) is the constant term of a random
polynomial f of degree t-1 over GF(p); holder x gets the share (x, f(x)). Any t shares give f(0)
by Lagrange interpolation, fewer reveal nothing about s. p = 2^256 + 297 is the smallest prime
above 2^256, so every 32-byte secret is a field element and a share's y fits in 33 bytes.

Shares are not authenticated: a tampered share interpolates to a different, valid-looking
secret. Callers that must detect this keep a commitment (secagg.py keeps sha256 of the
self-mask seed and the public key of the mask key) and check what `combine` returns.

Written here rather than taken from a library: `cryptography` has no secret sharing, and the
arithmetic is a few lines of Python big integers (t and n are at most a few dozen).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**256 + 297
SECRET_BYTES = 32
_X_BYTES = 2
_Y_BYTES = 33
SHARE_BYTES = _X_BYTES + _Y_BYTES
MAX_X = 2 ** (8 * _X_BYTES) - 1


class ShamirError(ValueError):
    """Shares or parameters that cannot be split or combined."""


@dataclass(frozen=True)
class Share:
    x: int  # the holder's coordinate, 1..MAX_X
    y: int  # f(x) mod PRIME

    def to_bytes(self) -> bytes:
        """2-byte x then 33-byte y, big-endian: SHARE_BYTES in all."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"share is {len(data)} bytes, expected {SHARE_BYTES}")
        x = int.from_bytes(data[:_X_BYTES], "big")
        y = int.from_bytes(data[_X_BYTES:], "big")
        if not 1 <= x <= MAX_X or y >= PRIME:
            raise ShamirError(f"share (x={x}) is not a point of the field")
        return cls(x, y)


def split(
    secret: bytes, threshold: int, xs: Sequence[int], rng: random.Random | None = None
) -> list[Share]:
    """One share per coordinate in `xs`; any `threshold` of them give back `secret`.

    `rng` draws the polynomial's coefficients; it defaults to the OS CSPRNG and must be one
    (e.g. random.SystemRandom) outside tests.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret is {len(secret)} bytes, expected {SECRET_BYTES}")
    if len(set(xs)) != len(xs):
        raise ShamirError(f"share coordinates are not distinct: {sorted(xs)}")
    if any(not 1 <= x <= MAX_X for x in xs):
        raise ShamirError(f"share coordinates must lie in 1..{MAX_X}: {sorted(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} is not in 1..{len(xs)} (the number of shares)")
    draw = rng.randrange if rng is not None else secrets.randbelow
    coefficients = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret whose polynomial passes through all `shares` (Lagrange at 0).

    Uses every share given, not just the first `threshold`, so a tampered share always changes
    the result (and a commitment check catches it) instead of sometimes going unnoticed.
    """
    if threshold < 1:
        raise ShamirError(f"threshold {threshold} is below 1")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed")
    secret = interpolate(shares, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares interpolate to no 32-byte secret: inconsistent or tampered")
    return secret.to_bytes(SECRET_BYTES, "big")


def interpolate(shares: Sequence[Share], x: int) -> int:
    """f(x) for the polynomial of degree < len(shares) through `shares` (Lagrange)."""
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"duplicate share coordinates among {sorted(xs)}")
    value = 0
    for j, share in enumerate(shares):
        numerator, denominator = 1, 1
        for m, other in enumerate(xs):
            if m != j:
                numerator = numerator * (x - other) % PRIME
                denominator = denominator * (share.x - other) % PRIME
        value = (value + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    # Horner, highest degree first
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
