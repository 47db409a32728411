"""The ledger file: `Ledger`, the SQLite store (WAL, synchronous=FULL) that appends a round's
records and its signed tree head in one transaction, reads them back and proves members' records.

    records(idx, data, signature)   idx 0, 1, 2, ...; data = a Record's canonical bytes (the
                                    Merkle leaf); signature = operator's Ed25519 signature over
                                    ("fedmoe-record-v1", idx, leaf hash)
    heads(size, root, time, signature, key_id)
                                    one signed tree head per appended round, over
                                    ("fedmoe-sth-v1", size, root, time)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from server.faults import kill_point
from server.ledger.errors import LedgerError, RecordError
from server.ledger.merkle import _mth, _path, _subproof, leaf_hash
from server.ledger.proofs import IncludedRecord, MemberProof
from server.ledger.records import Record, _parse_utc, utc_now
from server.ledger.signing import OperatorKey, SignedTreeHead, record_signing_bytes, sth_bytes

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
            self._conn.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR): a second
            # ROLLBACK would then fail and hide the error that matters
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

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
        try:
            return self._append(key, records, rnd)
        except sqlite3.DatabaseError as exc:  # disk full, I/O error, read-only file: rolled back
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LedgerError(
                f"{self.path}: cannot append round {rnd} ({reason}); nothing of it was appended,"
                " earlier rounds are as they were"
            ) from None

    def _append(self, key: OperatorKey, records: list[Record], rnd: int) -> SignedTreeHead:
        """append_round's one transaction."""
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
                kill_point("mid-ledger")  # inside the transaction: one row in, the rest and the head not
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
