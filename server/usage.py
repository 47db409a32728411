"""The usage log: every token the hub meters, as a tamper-evident log a member can check its bill against.

    <workspace>/operator/usage-<run>.sqlite     debits (canonical JSON leaves) and signed heads

A debit is one hosted generation: {"member", "period", "prompt_tokens", "completion_tokens",
"release_round", "time"} as canonical JSON (sorted keys, no spaces): an RFC 6962 Merkle leaf
(server/ledger/merkle.py), appended in one SQLite transaction (WAL, synchronous=FULL) with a new
head signed by the operator's Ed25519 key over HEAD_DOMAIN + "size root time". Several hub
processes may share one log: each append takes SQLite's write lock and reads what others
appended. A member is sent its debits of the period with their inclusion proofs and the head (GetUsage); `fedmoe usage`
checks every proof and the signature and that the debits add up to what it is charged. A head
signed for the usage log can never pass for a ledger head: the signed bytes start differently.

Quota holds: before a generation the hub holds the most it may cost (prompt + max new tokens)
in the same database, checked against debits and live holds in one transaction, and settles it
into a debit after; so hub processes sharing one log never overspend a quota together. A hold
a crashed hub never settled expires after HOLD_SECONDS; until then it counts against the quota
(a debit that fails to be written leaves its hold in place: fail closed).

Periods are fixed windows of `period_days` UTC days counted from 1970-01-01 (the policy's), so
the operator and a member compute the same period from a date.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.ledger import OperatorKey, utc_now
from server.ledger.merkle import _mth, inclusion_proof, leaf_hash

HEAD_DOMAIN = b"fedmoe-usage-head-v1\n"
HOLD_SECONDS = 900.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS debits (
    idx INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    member TEXT NOT NULL,
    period TEXT NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS debits_member_period ON debits (member, period);
CREATE TABLE IF NOT EXISTS holds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    member TEXT NOT NULL,
    period TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    size INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    time TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""


def head_bytes(size: int, root_hex: str, time: str) -> bytes:
    return HEAD_DOMAIN + f"{size} {root_hex} {time}".encode()


def period_start(period_days: int, today: dt.date | None = None) -> str:
    """The first UTC day of the period `today` falls in, ISO 8601."""
    today = today or dt.datetime.now(dt.UTC).date()
    epoch = dt.date(1970, 1, 1)
    days = (today - epoch).days
    return (epoch + dt.timedelta(days=days - days % period_days)).isoformat()


@dataclass(frozen=True)
class Head:
    size: int
    root: str
    time: str
    signature: bytes


@dataclass(frozen=True)
class Debit:
    index: int
    entry: bytes
    proof: list[bytes]


class UsageLog:
    """Append-only; thread-safe (the hub serves calls on many threads)."""

    def __init__(self, path: Path, key: OperatorKey) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._leaves = [leaf_hash(bytes(e)) for (e,) in self._conn.execute("SELECT entry FROM debits ORDER BY idx")]

    def close(self) -> None:
        self._conn.close()

    def used(self, member: str, period: str) -> int:
        with self._lock:
            (total,) = self._conn.execute("SELECT COALESCE(SUM(tokens), 0) FROM debits WHERE member = ? AND period = ?",
                                          (member, period)).fetchone()
        return int(total)

    def hold(self, member: str, period: str, tokens: int, quota: int) -> tuple[int | None, int]:
        """(a hold of `tokens` for `member`, or None when debits and live holds leave less than
        that of `quota`; what they add up to), in one transaction across processes."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM holds WHERE expires <= ?", (now,))
                (debited,) = self._conn.execute("SELECT COALESCE(SUM(tokens), 0) FROM debits WHERE member = ? AND period = ?",
                                                (member, period)).fetchone()
                (held,) = self._conn.execute("SELECT COALESCE(SUM(tokens), 0) FROM holds WHERE member = ? AND period = ?",
                                             (member, period)).fetchone()
                taken = int(debited) + int(held)
                hold_id = None
                if taken + tokens <= quota:
                    hold_id = self._conn.execute("INSERT INTO holds (member, period, tokens, expires) VALUES (?, ?, ?, ?)",
                                                 (member, period, tokens, now + HOLD_SECONDS)).lastrowid
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return hold_id, taken

    def release_hold(self, hold_id: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))

    def debit(self, member: str, period: str, prompt_tokens: int, completion_tokens: int, release_round: int,
              hold_id: int | None = None) -> Head:
        """Append one generation's tokens and sign the new head, settling its hold, in one transaction."""
        entry = json.dumps({"member": member, "period": period, "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens, "release_round": release_round, "time": utc_now()},
                           sort_keys=True, separators=(",", ":")).encode()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # the write lock first: another hub process may append too
            try:
                (count,) = self._conn.execute("SELECT COUNT(*) FROM debits").fetchone()
                if count != len(self._leaves):  # appended by another process since: read them
                    self._leaves = [leaf_hash(bytes(e)) for (e,) in self._conn.execute("SELECT entry FROM debits ORDER BY idx")]
                leaves = [*self._leaves, leaf_hash(entry)]
                root_hex = _mth(leaves, 0, len(leaves)).hex()
                now = utc_now()
                signature = self.key.sign(head_bytes(len(leaves), root_hex, now))
                self._conn.execute("INSERT INTO debits (idx, entry, member, period, tokens) VALUES (?, ?, ?, ?, ?)",
                                   (len(leaves) - 1, entry, member, period, prompt_tokens + completion_tokens))
                self._conn.execute("INSERT INTO heads (size, root, time, signature) VALUES (?, ?, ?, ?)",
                                   (len(leaves), root_hex, now, signature.hex()))
                if hold_id is not None:
                    self._conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._leaves = leaves
        return Head(len(leaves), root_hex, now, signature)

    def statement(self, member: str, period: str) -> tuple[Head | None, list[Debit]]:
        """The latest head and the member's debits of the period, each with its inclusion proof."""
        with self._lock:
            row = self._conn.execute("SELECT size, root, time, signature FROM heads ORDER BY size DESC LIMIT 1").fetchone()
            if row is None:
                return None, []
            head = Head(int(row[0]), row[1], row[2], bytes.fromhex(row[3]))
            entries = [bytes(e) for (e,) in self._conn.execute("SELECT entry FROM debits WHERE idx < ? ORDER BY idx", (head.size,))]
            mine = self._conn.execute("SELECT idx FROM debits WHERE member = ? AND period = ? AND idx < ? ORDER BY idx",
                                      (member, period, head.size)).fetchall()
        return head, [Debit(i, entries[i], inclusion_proof(entries, i)) for (i,) in mine]
