"""The ledger's records (the Merkle leaves): `Record`, its canonical bytes, and UTC times.

A record is one member's line for one round; its canonical bytes are what the Merkle tree hashes
and what the operator signs, so they must never change for a given record.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from server.ledger.errors import RecordError

_HEX64 = re.compile(r"[0-9a-f]{64}")


def utc_now() -> str:
    """Now as ISO-8601 UTC with microseconds and a `Z` suffix, the form the ledger writes."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_utc(value: str, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise RecordError(f"{what}: {value!r} is not an ISO-8601 time") from None
    if parsed.tzinfo is None or parsed.utcoffset() != UTC.utcoffset(None):
        raise RecordError(f"{what}: {value!r} is not in UTC (end it with Z or +00:00)")
    return parsed



@dataclass(frozen=True)
class Record:
    """One member's line for one round.

    Canonical bytes (the Merkle leaf): the fields as one JSON object with keys sorted, no
    whitespace (separators "," and ":"), ASCII only (other characters as \\uXXXX escapes), ints
    as ints, floats as Python's `repr` (shortest string that reads back to the same double; no
    NaN or Infinity), `dp_epsilon` null when DP is off. `from_canonical` accepts exactly these
    bytes and nothing else.

    `tokens`, `bytes_up` and `bytes_down` are self-reported or transport counts, informational
    only: credit comes from `score` (measured by the operator on held-out validation loss).
    """

    round: int
    member: str
    score: float
    share: float
    tokens: int
    bytes_up: int
    bytes_down: int
    dp_epsilon: float | None
    release_sha256: str
    time: str
    kind: str = "contribution"

    def __post_init__(self) -> None:
        for name in ("round", "tokens", "bytes_up", "bytes_down"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RecordError(f"record field {name!r}: expected an integer >= 0, got {value!r}")
        for name in ("score", "share", "dp_epsilon"):
            value = getattr(self, name)
            if value is None and name == "dp_epsilon":
                continue
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise RecordError(f"record field {name!r}: expected a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.dp_epsilon is not None and self.dp_epsilon < 0:
            raise RecordError(f"record field 'dp_epsilon': expected >= 0, got {self.dp_epsilon!r}")
        for name in ("member", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise RecordError(
                    f"record field {name!r}: expected a non-empty string, got {value!r}"
                )
        if not isinstance(self.release_sha256, str) or not _HEX64.fullmatch(self.release_sha256):
            raise RecordError(
                f"record field 'release_sha256': expected 64 lowercase hex digits, got {self.release_sha256!r}"
            )
        if not isinstance(self.time, str):
            raise RecordError(f"record field 'time': expected a string, got {self.time!r}")
        _parse_utc(self.time, "record field 'time'")

    def canonical(self) -> bytes:
        return json.dumps(
            asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")

    @classmethod
    def from_canonical(cls, data: bytes) -> Record:
        """Parse canonical bytes; anything else (extra/missing keys, wrong types, other spacing
        or number forms, duplicate keys) raises RecordError."""

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise RecordError(f"record: duplicate key {key!r}")
                out[key] = value
            return out

        try:
            obj = json.loads(data.decode("ascii"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"record: not ASCII JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(obj, dict):
            raise RecordError("record: not a JSON object")
        expected = {f.name for f in fields(cls)}
        if set(obj) != expected:
            missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
            raise RecordError(
                f"record: keys differ from a Record (missing {missing}, unexpected {extra})"
            )
        for name in ("score", "share", "dp_epsilon"):
            if not (isinstance(obj[name], float) or (name == "dp_epsilon" and obj[name] is None)):
                raise RecordError(
                    f"record field {name!r}: expected a JSON float, got {obj[name]!r}"
                )
        record = cls(**obj)
        if record.canonical() != data:
            raise RecordError("record: bytes are not in canonical form")
        return record
