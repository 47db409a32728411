"""Member proofs: what a member takes home from the operator and checks offline, namely that its
records are in the log and that the log only grew since a tree head it saw before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.ledger.errors import LedgerError, RecordError
from server.ledger.merkle import verify_consistency, verify_inclusion
from server.ledger.records import _HEX64, Record
from server.ledger.signing import SignedTreeHead, load_public_key

PROOF_FORMAT = "fedmoe-member-proof-v1"


@dataclass(frozen=True)
class IncludedRecord:
    index: int
    record: bytes  # canonical bytes
    proof: list[bytes]


@dataclass(frozen=True)
class MemberProof:
    member: str
    head: SignedTreeHead
    records: list[IncludedRecord]
    since: SignedTreeHead | None
    consistency: list[bytes]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PROOF_FORMAT,
                "member": self.member,
                "head": self.head.to_json(),
                "records": [
                    {
                        "index": r.index,
                        "record": r.record.decode("ascii"),
                        "proof": [p.hex() for p in r.proof],
                    }
                    for r in self.records
                ],
                "since": None if self.since is None else self.since.to_json(),
                "consistency": [p.hex() for p in self.consistency],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> MemberProof:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise LedgerError(f"proof: not JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(obj, dict) or obj.get("format") != PROOF_FORMAT:
            raise LedgerError(f"proof: not a {PROOF_FORMAT} document")
        try:
            entries = [
                IncludedRecord(
                    _int(e["index"], "records[].index"),
                    e["record"].encode("ascii"),
                    [_hash(p, "records[].proof") for p in e["proof"]],
                )
                for e in obj["records"]
            ]
            since = None if obj["since"] is None else SignedTreeHead.from_json(obj["since"])
            return cls(
                member=str(obj["member"]),
                head=SignedTreeHead.from_json(obj["head"]),
                records=entries,
                since=since,
                consistency=[_hash(p, "consistency") for p in obj["consistency"]],
            )
        except (KeyError, TypeError, AttributeError, UnicodeEncodeError) as exc:
            raise LedgerError(f"proof: malformed ({type(exc).__name__}: {exc})") from None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LedgerError(f"proof: {what} {value!r} is not an integer")
    return value


def _hash(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise LedgerError(f"proof: {what} entry {value!r} is not 64 lowercase hex digits")
    return bytes.fromhex(value)


def verify_member_proof(proof_json: str | bytes, operator_public_key_pem: bytes) -> list[str]:
    """Check a member proof offline: head signatures, every record's inclusion under the latest
    head, and the consistency of the earlier head with it. Returns problems; [] means verified."""
    try:
        public_key = load_public_key(operator_public_key_pem, "operator public key")
        proof = MemberProof.from_json(proof_json)
    except LedgerError as exc:
        return [str(exc)]
    problems: list[str] = []
    head = proof.head
    if not head.verify(public_key):
        problems.append(
            f"tree head (size {head.size}): signature does not verify with the operator key"
        )
    head_root = bytes.fromhex(head.root)
    seen: set[int] = set()
    for entry in proof.records:
        where = f"record {entry.index}"
        if entry.index in seen:
            problems.append(f"{where}: listed twice")
        seen.add(entry.index)
        try:
            record = Record.from_canonical(entry.record)
        except RecordError as exc:
            problems.append(f"{where}: {exc}")
            continue
        where = f"record {entry.index} (round {record.round})"
        if record.member != proof.member:
            problems.append(f"{where}: belongs to {record.member!r}, not {proof.member!r}")
        if not verify_inclusion(entry.record, entry.index, head.size, entry.proof, head_root):
            problems.append(
                f"{where}: inclusion proof does not match the tree head (size {head.size})"
            )
    if proof.since is not None:
        since = proof.since
        if not since.verify(public_key):
            problems.append(f"earlier tree head (size {since.size}): signature does not verify")
        if not verify_consistency(
            since.size, head.size, bytes.fromhex(since.root), head_root, proof.consistency
        ):
            problems.append(
                f"earlier tree head (size {since.size}) is not a prefix of the tree head (size {head.size}):"
                " the log was rewritten"
            )
    return problems
