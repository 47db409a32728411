"""The operator's transparency ledger: an append-only, Ed25519-signed, RFC 6962-style Merkle log
of every member's contribution per round, which anyone holding the operator's public key can audit.

    records(idx, data, signature)   idx 0, 1, 2, ...; data = a Record's canonical bytes (the
                                    Merkle leaf); signature = operator's Ed25519 signature over
                                    ("fedmoe-record-v1", idx, leaf hash)
    heads(size, root, time, signature, key_id)
                                    one signed tree head per appended round, over
                                    ("fedmoe-sth-v1", size, root, time)

Layers, top to bottom:
  * `Record` and its canonical bytes (the leaves).
  * Pure Merkle functions over leaves (RFC 6962 §2.1 / RFC 9162 §2.1): `root`,
    `inclusion_proof`/`verify_inclusion`, `consistency_proof`/`verify_consistency`.
  * `SignedTreeHead` and `OperatorKey` (Ed25519, PEM file with 0600 permissions).
  * `Ledger`: SQLite (WAL, synchronous=FULL); `append_round` writes a round's records and the new
    signed head in ONE transaction, so a crash leaves either the whole round or none of it.
  * `MemberProof` / `verify_member_proof`: a member's offline check that its records are in the
    log and that the log only grew since a head it saw before.
  * `verify`: recompute everything from the file; names the first bad record or head.

The tree heads are what members hold the operator to (inclusion and consistency proofs). The
per-record signatures are for `verify` on the file itself: a root only says "something in this
round changed", the record signature says which record. Neither protects against whoever holds
the operator key; rolling the whole file back to an earlier consistent state is caught by the
members, whose saved heads then fail the consistency check (`Ledger.prove` refuses a newer head).

Self-reported numbers never decide credit: `tokens` (and `bytes_up`/`bytes_down`) are recorded
for information only; the round loop bounds tokens by the round's token budget, and credit comes
from `score`, which the operator measures on held-out validation loss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

STH_DOMAIN = b"fedmoe-sth-v1"
RECORD_DOMAIN = b"fedmoe-record-v1"
PROOF_FORMAT = "fedmoe-member-proof-v1"
EMPTY_ROOT = hashlib.sha256(b"").digest()

_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (bad append, missing file, inconsistent state)."""


class RecordError(ValueError):
    """A record's fields or bytes are not a valid canonical record."""


class OperatorKeyError(LedgerError):
    """The operator's key file is missing, malformed or readable by others."""


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


# --------------------------------------------------------------------------------------------
# Records (the leaves)


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


# --------------------------------------------------------------------------------------------
# Merkle tree (RFC 6962 §2.1; verification algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2)


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of the leaves whose leaf hashes are hashes[lo:hi]."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def _path(hashes: Sequence[bytes], m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return _path(hashes, m, lo, lo + k) + [_mth(hashes, lo + k, hi)]
    return _path(hashes, m - k, lo + k, hi) + [_mth(hashes, lo, lo + k)]


def _subproof(hashes: Sequence[bytes], m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if complete else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:
        return _subproof(hashes, m, lo, lo + k, complete) + [_mth(hashes, lo + k, hi)]
    return _subproof(hashes, m - k, lo + k, hi, False) + [_mth(hashes, lo, lo + k)]


def prefix_roots(hashes: Sequence[bytes]) -> Iterator[bytes]:
    """MTH of hashes[:1], hashes[:2], ... in one pass (a stack of perfect subtrees)."""
    stack: list[tuple[int, bytes]] = []  # (leaf count, hash), counts strictly decreasing
    for h in hashes:
        stack.append((1, h))
        while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
            (n, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * n, node_hash(left, right)))
        acc = stack[-1][1]
        for _, left in reversed(stack[:-1]):
            acc = node_hash(left, acc)
        yield acc


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash of the leaves (SHA-256 of the empty string for no leaves)."""
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return _mth(hashes, 0, len(hashes))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path of leaf `index` in the tree of all `leaves`, from the leaf upwards."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"inclusion_proof: index {index} outside a tree of size {len(leaves)}")
    return _path([leaf_hash(leaf) for leaf in leaves], index, 0, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the tree of the first `old_size` leaves is a prefix of the tree of all."""
    if not 0 <= old_size <= len(leaves):
        raise ValueError(f"consistency_proof: old size {old_size} outside 0..{len(leaves)}")
    if old_size == 0:
        return []
    return _subproof([leaf_hash(leaf) for leaf in leaves], old_size, 0, len(leaves), True)


def _well_formed(proof: Sequence[bytes], *hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == 32 for h in (*proof, *hashes))


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    if not 0 <= index < size or not _well_formed(proof, root):
        return False
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    if not 0 <= old_size <= new_size or not _well_formed(proof, old_root, new_root):
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if (
        old_size & (old_size - 1) == 0
    ):  # the old tree is a complete subtree: its root starts the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)


# --------------------------------------------------------------------------------------------
# Keys and signed tree heads


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(pem: bytes | Ed25519PublicKey, source: str = "public key") -> Ed25519PublicKey:
    if isinstance(pem, Ed25519PublicKey):
        return pem
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise OperatorKeyError(
            f"{source}: not a PEM public key ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise OperatorKeyError(f"{source}: not an Ed25519 public key ({type(key).__name__})")
    return key


@dataclass(frozen=True)
class OperatorKey:
    """The operator's Ed25519 signing key, kept as a PEM (PKCS#8) file only its owner can read."""

    private_key: Ed25519PrivateKey

    @classmethod
    def load(cls, path: Path) -> OperatorKey:
        if not path.is_file():
            raise OperatorKeyError(f"{path}: no operator key file")
        mode = path.stat().st_mode & 0o777
        if os.name == "posix" and mode & 0o077:
            raise OperatorKeyError(
                f"{path}: operator key is readable by others (mode {mode:o}); chmod 600 it"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise OperatorKeyError(
                f"{path}: not a PEM private key ({str(exc).splitlines()[0]})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise OperatorKeyError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> OperatorKey:
        """Load the key at `path`, or create one there (mode 0600, never over an existing file)."""
        if path.exists():
            return cls.load(path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and refuses to replace a key created meanwhile
            except FileExistsError:
                return cls.load(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def _verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SignedTreeHead:
    """The operator's signed statement "the log has `size` records and this Merkle root"."""

    size: int
    root: str  # hex
    time: str  # ISO-8601 UTC
    signature: str  # hex Ed25519 signature over signed_bytes()
    key_id: str  # hex sha256 of the raw public key

    def signed_bytes(self) -> bytes:
        return sth_bytes(self.size, self.root, self.time)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return self.key_id == key_id_of(public_key) and _verify_signature(
            public_key, signature, self.signed_bytes()
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> SignedTreeHead:
        if not isinstance(obj, dict) or set(obj) != {f.name for f in fields(cls)}:
            raise LedgerError("tree head: expected keys size, root, time, signature, key_id")
        size, root_hex = obj["size"], obj["root"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LedgerError(f"tree head: size {size!r} is not an integer >= 0")
        if not isinstance(root_hex, str) or not _HEX64.fullmatch(root_hex):
            raise LedgerError(f"tree head: root {root_hex!r} is not 64 lowercase hex digits")
        for name in ("time", "signature", "key_id"):
            if not isinstance(obj[name], str):
                raise LedgerError(f"tree head: {name} {obj[name]!r} is not a string")
        return cls(**obj)


def sth_bytes(size: int, root_hex: str, time: str) -> bytes:
    """What a tree head's signature covers: domain, size, root, time, newline-separated."""
    return b"\n".join([STH_DOMAIN, str(size).encode(), root_hex.encode(), time.encode()])


def record_signing_bytes(index: int, leaf: bytes) -> bytes:
    """What a record row's signature covers: domain, position, leaf hash."""
    return b"\n".join([RECORD_DOMAIN, str(index).encode(), leaf_hash(leaf).hex().encode()])


# --------------------------------------------------------------------------------------------
# Member proofs (what a member takes home and checks offline)


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


# --------------------------------------------------------------------------------------------
# The ledger file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    idx INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    size INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    time TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id TEXT NOT NULL
);
"""


class Ledger:
    """The operator's log file. Open with the operator key to append; without it to read/prove."""

    def __init__(
        self,
        path: Path,
        key: OperatorKey | None = None,
        *,
        create: bool = True,
        clock: Callable[[], str] = utc_now,
    ) -> None:
        if not create and not path.is_file():
            raise LedgerError(f"{path}: no ledger file")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.key = key
        self._clock = clock
        self._conn = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self._conn.execute("PRAGMA busy_timeout=10000")
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{path}: SQLite refused WAL journal mode (got {mode!r})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")  # take the write lock before reading the state
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def append_round(self, records: Sequence[Record]) -> SignedTreeHead:
        """Append one round's records and sign the new tree head, in one transaction.

        All records must carry the same round, later than every round already in the log (so
        a resumed round is never recorded twice)."""
        if self.key is None:
            raise LedgerError(f"{self.path}: opened without the operator key, cannot append")
        key = self.key
        records = list(records)
        if not records:
            raise LedgerError("append_round: no records to append")
        rounds = sorted({r.round for r in records})
        if len(rounds) != 1:
            raise LedgerError(f"append_round: records span rounds {rounds}, expected one round")
        rnd = rounds[0]
        with self._transaction():
            hashes = self._leaf_hashes()
            latest = self._latest_head()
            if (latest.size if latest else 0) != len(hashes):
                raise LedgerError(
                    f"{self.path}: {len(hashes)} records but the latest tree head covers"
                    f" {latest.size if latest else 0}; run `fedmoe ledger verify`"
                )
            last = self._latest_round()
            if last is not None and rnd <= last:
                raise LedgerError(
                    f"append_round: round {rnd} is not after the ledger's latest round {last}"
                )
            for record in records:
                data = record.canonical()
                index = len(hashes)
                signature = key.sign(record_signing_bytes(index, data))
                self._conn.execute(
                    "INSERT INTO records (idx, data, signature) VALUES (?, ?, ?)",
                    (index, data, signature.hex()),
                )
                hashes.append(leaf_hash(data))
            now = self._clock()
            _parse_utc(now, "ledger clock")
            if latest is not None and _parse_utc(now, "clock") < _parse_utc(
                latest.time, "head time"
            ):
                now = latest.time  # heads never go back in time, even if the wall clock does
            root_hex = _mth(hashes, 0, len(hashes)).hex()
            signature = key.sign(sth_bytes(len(hashes), root_hex, now))
            head = SignedTreeHead(len(hashes), root_hex, now, signature.hex(), key.key_id)
            self._conn.execute(
                "INSERT INTO heads (size, root, time, signature, key_id) VALUES (?, ?, ?, ?, ?)",
                (head.size, head.root, head.time, head.signature, head.key_id),
            )
        return head

    def _rows(self) -> list[tuple[int, bytes]]:
        return [
            (i, bytes(d))
            for i, d in self._conn.execute("SELECT idx, data FROM records ORDER BY idx")
        ]

    def _leaf_hashes(self) -> list[bytes]:
        return [leaf_hash(d) for _, d in self._rows()]

    def _latest_head(self) -> SignedTreeHead | None:
        row = self._conn.execute(
            "SELECT size, root, time, signature, key_id FROM heads ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return None if row is None else SignedTreeHead(*row)

    def _latest_round(self) -> int | None:
        row = self._conn.execute(
            "SELECT idx, data FROM records ORDER BY idx DESC LIMIT 1"
        ).fetchone()
        return None if row is None else self._parse(row[0], bytes(row[1])).round

    def _parse(self, index: int, data: bytes) -> Record:
        try:
            return Record.from_canonical(data)
        except RecordError as exc:
            raise LedgerError(
                f"{self.path}: record {index}: {exc}; run `fedmoe ledger verify`"
            ) from None

    def records(self) -> list[Record]:
        return [self._parse(i, d) for i, d in self._rows()]

    def heads(self) -> list[SignedTreeHead]:
        rows = self._conn.execute(
            "SELECT size, root, time, signature, key_id FROM heads ORDER BY size"
        )
        return [SignedTreeHead(*row) for row in rows]

    def latest_head(self) -> SignedTreeHead | None:
        return self._latest_head()

    def latest_round(self) -> int | None:
        """The round of the last appended record (None for an empty ledger)."""
        return self._latest_round()

    def prove(self, member: str, since_head: SignedTreeHead | None = None) -> MemberProof:
        """Inclusion proofs of every record of `member` under the latest head, plus a
        consistency proof from `since_head` (a head the member saved earlier) to it."""
        rows = self._rows()
        head = self._latest_head()
        if head is None:
            raise LedgerError(f"{self.path}: the ledger is empty")
        if head.size != len(rows):
            raise LedgerError(
                f"{self.path}: {len(rows)} records but the latest tree head covers {head.size};"
                " run `fedmoe ledger verify`"
            )
        hashes = [leaf_hash(d) for _, d in rows]
        if _mth(hashes, 0, len(hashes)).hex() != head.root:
            raise LedgerError(
                f"{self.path}: records do not match the latest tree head; run `fedmoe ledger verify`"
            )
        if since_head is not None and since_head.size > head.size:
            raise LedgerError(
                f"the earlier tree head has size {since_head.size}, larger than the ledger's {head.size}:"
                " the log was rolled back"
            )
        entries = [
            IncludedRecord(i, d, _path(hashes, i, 0, len(hashes)))
            for i, d in rows
            if self._parse(i, d).member == member
        ]
        if not entries:
            raise LedgerError(f"{self.path}: no records of member {member!r}")
        consistency: list[bytes] = []
        if since_head is not None and since_head.size > 0:
            consistency = _subproof(hashes, since_head.size, 0, len(hashes), True)
        return MemberProof(member, head, entries, since_head, consistency)


# --------------------------------------------------------------------------------------------
# Audit of the whole file


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
