"""The operator's transparency ledger: an append-only, Ed25519-signed, RFC 6962-style Merkle log
of every member's contribution per round, which anyone holding the operator's public key can audit.

Modules, bottom to top:
  * `errors`: `LedgerError`, `RecordError`, `OperatorKeyError`.
  * `records`: `Record` and its canonical bytes (the leaves); `utc_now`.
  * `merkle`: pure Merkle functions over leaves (RFC 6962 §2.1 / RFC 9162 §2.1): `root`,
    `inclusion_proof`/`verify_inclusion`, `consistency_proof`/`verify_consistency`.
  * `signing`: `SignedTreeHead` and `OperatorKey` (Ed25519, PEM file with 0600 permissions),
    and the bytes each signature covers.
  * `proofs`: `MemberProof` / `verify_member_proof`: a member's offline check that its records
    are in the log and that the log only grew since a head it saw before.
  * `store`: `Ledger`: SQLite (WAL, synchronous=FULL), tables `records` and `heads` (schema in
    its docstring); `append_round` writes a round's records and the new signed head in ONE
    transaction, so a crash leaves either the whole round or none of it.
  * `audit`: `verify`: recompute everything from the file; names the first bad record or head.

The tree heads are what members hold the operator to (inclusion and consistency proofs). The
per-record signatures are for `verify` on the file itself: a root only says "something in this
round changed", the record signature says which record. Neither protects against whoever holds
the operator key; rolling the whole file back to an earlier consistent state is caught by the
members, whose saved heads then fail the consistency check (`Ledger.prove` refuses a newer head).

Self-reported numbers never decide credit: `tokens` (and `bytes_up`/`bytes_down`) are recorded
for information only; the round loop bounds tokens by the round's token budget, and credit comes
from `score`, which the operator measures on held-out validation loss.

Import from the package (`from server.ledger import Ledger, Record`); the names below are its API.
"""

from __future__ import annotations

from server.ledger.audit import VerifyReport, verify
from server.ledger.errors import LedgerError, OperatorKeyError, RecordError
from server.ledger.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    prefix_roots,
    root,
    verify_consistency,
    verify_inclusion,
)
from server.ledger.proofs import PROOF_FORMAT, IncludedRecord, MemberProof, verify_member_proof
from server.ledger.records import Record, utc_now
from server.ledger.signing import (
    RECORD_DOMAIN,
    STH_DOMAIN,
    OperatorKey,
    SignedTreeHead,
    key_id_of,
    load_public_key,
    record_signing_bytes,
    sth_bytes,
)
from server.ledger.store import Ledger

__all__ = [
    "EMPTY_ROOT",
    "PROOF_FORMAT",
    "RECORD_DOMAIN",
    "STH_DOMAIN",
    "IncludedRecord",
    "Ledger",
    "LedgerError",
    "MemberProof",
    "OperatorKey",
    "OperatorKeyError",
    "Record",
    "RecordError",
    "SignedTreeHead",
    "VerifyReport",
    "consistency_proof",
    "inclusion_proof",
    "key_id_of",
    "leaf_hash",
    "load_public_key",
    "node_hash",
    "prefix_roots",
    "record_signing_bytes",
    "root",
    "sth_bytes",
    "utc_now",
    "verify",
    "verify_consistency",
    "verify_inclusion",
    "verify_member_proof",
]
