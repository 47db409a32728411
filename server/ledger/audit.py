"""The ledger's audit: `verify` recomputes everything from the file (record positions and
signatures, head signatures, order and Merkle roots) and names the first bad record or head.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger.errors import RecordError
from server.ledger.merkle import leaf_hash, prefix_roots
from server.ledger.records import Record, _parse_utc
from server.ledger.signing import (
    SignedTreeHead,
    _verify_signature,
    key_id_of,
    load_public_key,
    record_signing_bytes,
)

@dataclass(frozen=True)
class VerifyReport:
    records: int
    heads: int
    problem: str | None = None  # one line: the first thing wrong
    first_bad_index: int | None = None  # the first bad record, when a record is to blame
    first_bad_head: int | None = None  # the size of the first bad head, when a head is to blame

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path, public_key: bytes | Ed25519PublicKey) -> VerifyReport:
    """Recompute the ledger from the file: every record's position and signature, every head's
    signature, order and Merkle root. Reports the first bad record (else the first bad head)."""
    key = load_public_key(public_key, "operator public key")
    key_id = key_id_of(key)
    if not path.is_file():
        return VerifyReport(0, 0, f"{path}: no ledger file")
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = [
            (i, bytes(d), s)
            for i, d, s in conn.execute("SELECT idx, data, signature FROM records ORDER BY idx")
        ]
        head_rows = conn.execute(
            "SELECT size, root, time, signature, key_id FROM heads ORDER BY size"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        return VerifyReport(0, 0, f"{path}: not a fedmoe ledger ({exc})")
    finally:
        conn.close()
    heads = [SignedTreeHead(*row) for row in head_rows]
    latest_size = heads[-1].size if heads else 0

    def bad_record(index: int, data: bytes | None, why: str) -> VerifyReport:
        who = ""
        if data is not None:
            try:
                record = Record.from_canonical(data)
                who = f" (round {record.round}, member {record.member!r})"
            except RecordError:
                who = " (unreadable)"
        return VerifyReport(
            len(rows), len(heads), f"{path}: record {index}{who}: {why}", first_bad_index=index
        )

    if heads and heads[-1].key_id != key_id:
        message = f"{path}: signed by key {heads[-1].key_id[:16]}…, not by this public key ({key_id[:16]}…)"
        return VerifyReport(len(rows), len(heads), message, first_bad_head=heads[-1].size)

    hashes: list[bytes] = []
    for expected, (index, data, signature) in enumerate(rows):
        if index != expected:
            return bad_record(
                expected, None, f"missing (the next stored record is {index}): deleted"
            )
        try:
            Record.from_canonical(data)
        except RecordError as exc:
            return bad_record(index, data, f"edited ({exc})")
        try:
            signature_bytes = bytes.fromhex(signature)
        except (TypeError, ValueError):
            signature_bytes = b""
        if not _verify_signature(key, signature_bytes, record_signing_bytes(index, data)):
            return bad_record(
                index,
                data,
                "its signature does not match this position: edited, deleted, reordered or inserted",
            )
        if index >= latest_size:
            return bad_record(
                index, data, f"not covered by any signed tree head (latest covers {latest_size})"
            )
        hashes.append(leaf_hash(data))

    roots = list(prefix_roots(hashes))
    previous: SignedTreeHead | None = None
    for head in heads:

        def bad_head(why: str, head: SignedTreeHead = head) -> VerifyReport:
            message = f"{path}: tree head of size {head.size} ({head.time}): {why}"
            return VerifyReport(len(rows), len(heads), message, first_bad_head=head.size)

        if head.key_id != key_id:
            return bad_head(
                f"signed by key {head.key_id[:16]}…, not the operator key {key_id[:16]}…"
            )
        if not head.verify(key):
            return bad_head("signature does not verify: edited")
        if head.size < 1 or head.size > len(hashes):
            return bad_head(f"covers {head.size} records but the ledger holds {len(hashes)}")
        if head.root != roots[head.size - 1].hex():
            return bad_head("root is not the Merkle root of the records it covers")
        try:
            if previous is not None and _parse_utc(head.time, "") < _parse_utc(previous.time, ""):
                return bad_head(f"time goes back from {previous.time}")
        except RecordError:
            return bad_head("time is not ISO-8601 UTC")
        previous = head
    return VerifyReport(len(rows), len(heads))
