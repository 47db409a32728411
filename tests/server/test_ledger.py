"""The transparency ledger: Merkle proofs against a brute-force RFC 6962 construction, canonical
records, signed heads, tamper detection on the SQLite file itself, crash safety, member proofs
and the `fedmoe ledger` sub-app."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedmoe.ledger_cmd import ledger_app
from server.ledger import (
    Ledger,
    LedgerError,
    OperatorKey,
    OperatorKeyError,
    Record,
    RecordError,
    SignedTreeHead,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    prefix_roots,
    root,
    verify,
    verify_consistency,
    verify_inclusion,
    verify_member_proof,
)

SHA = "ab" * 32
MEMBERS = ("acme", "globex", "initech")
ROUNDS = 4  # 3 records per round: indices 0-2 round 1, 3-5 round 2, 6-8 round 3, 9-11 round 4


# ---------------------------------------------------------------- brute force, straight from RFC 6962 §2.1


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def brute_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + brute_mth(d[:k]) + brute_mth(d[k:]))


def brute_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return brute_path(m, d[:k]) + [brute_mth(d[k:])]
    return brute_path(m - k, d[k:]) + [brute_mth(d[:k])]


def brute_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [brute_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return brute_subproof(m, d[:k], b) + [brute_mth(d[k:])]
    return brute_subproof(m - k, d[k:], False) + [brute_mth(d[:k])]


def _leaves(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


def test_root_matches_brute_force_and_prefix_roots() -> None:
    assert root([]) == _h(b"")
    leaves = _leaves(40)
    prefixes = list(prefix_roots([leaf_hash(x) for x in leaves]))
    for n in range(1, 41):
        assert root(leaves[:n]) == brute_mth(leaves[:n])
        assert prefixes[n - 1] == brute_mth(leaves[:n])


def test_inclusion_proofs_all_sizes_and_indices() -> None:
    for n in range(1, 41):
        leaves = _leaves(n)
        top = brute_mth(leaves)
        for m in range(n):
            proof = inclusion_proof(leaves, m)
            assert proof == brute_path(m, leaves)
            assert verify_inclusion(leaves[m], m, n, proof, top)
            # tampered: any proof hash, the root, the leaf, the index, the size, the length
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = _flip(bad[j])
                assert not verify_inclusion(leaves[m], m, n, bad, top)
            assert not verify_inclusion(leaves[m], m, n, proof, _flip(top))
            assert not verify_inclusion(b"forged", m, n, proof, top)
            for other in range(n):
                if other != m:
                    assert not verify_inclusion(leaves[m], other, n, proof, top)
            # (the size is not checked here: it is bound by the signed head, and e.g. leaf 0's
            # path is the same in trees of size 3 and 4)
            assert not verify_inclusion(leaves[m], m, 2 * n + 1, proof, top)
            assert not verify_inclusion(leaves[m], m, n, [*proof, top], top)
            if proof:
                assert not verify_inclusion(leaves[m], m, n, proof[:-1], top)
        with pytest.raises(ValueError):
            inclusion_proof(leaves, n)


def test_consistency_proofs_all_sizes() -> None:
    for n in range(1, 41):
        leaves = _leaves(n)
        new_root = brute_mth(leaves)
        for m in range(n + 1):
            old_root = brute_mth(leaves[:m])
            proof = consistency_proof(leaves, m)
            assert proof == ([] if m == 0 else brute_subproof(m, leaves, True))
            assert verify_consistency(m, n, old_root, new_root, proof)
            if m == 0:
                continue
            assert not verify_consistency(m, n, _flip(old_root), new_root, proof)
            assert not verify_consistency(m, n, old_root, _flip(new_root), proof)
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = _flip(bad[j])
                assert not verify_consistency(m, n, old_root, new_root, bad)
            if proof:
                assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
                assert not verify_consistency(m, n, old_root, new_root, [*proof, new_root])
            if m < n:
                assert not verify_consistency(m, 2 * n + 1, old_root, new_root, proof)
                assert not verify_consistency(n, m, new_root, old_root, proof)  # shrinking
            # a different old tree (a fork) of the same size is not a prefix
            forked = [b"forked", *leaves[1:m]]
            assert not verify_consistency(m, n, brute_mth(forked), new_root, proof)


# ---------------------------------------------------------------- records


def make_record(
    rnd: int, member: str, score: float = 0.5, dp_epsilon: float | None = None, tokens: int = 1000
) -> Record:
    return Record(
        rnd, member, score, 0.25, tokens, 10, 20, dp_epsilon, SHA, "2025-01-02T03:04:05.000006Z"
    )


def test_canonical_form_is_sorted_compact_json() -> None:
    r = make_record(3, "acme", score=0.1, dp_epsilon=2)
    data = r.canonical()
    assert data.startswith(b'{"bytes_down":20,"bytes_up":10,"dp_epsilon":2.0,"kind":"contribution"')
    assert b" " not in data and b'"score":0.1,' in data
    assert Record.from_canonical(data) == r


@given(
    score=st.floats(allow_nan=False, allow_infinity=False),
    eps=st.none() | st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    member=st.text(min_size=1, max_size=20),
    tokens=st.integers(min_value=0, max_value=2**62),
)
def test_canonical_round_trip(score: float, eps: float | None, member: str, tokens: int) -> None:
    r = make_record(1, member, score=score, dp_epsilon=eps, tokens=tokens)
    assert Record.from_canonical(r.canonical()) == r
    assert Record.from_canonical(r.canonical()).canonical() == r.canonical()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b",", b", ", 1),  # whitespace
        lambda d: d.replace(b'"score":0.5', b'"score":5e-1'),  # another spelling of the float
        lambda d: d.replace(b'"score":0.5', b'"score":1'),  # int where a float belongs
        lambda d: d.replace(b'"tokens":1000', b'"tokens":1000.0'),
        lambda d: d.replace(b'"score":0.5', b'"score":NaN'),
        lambda d: d[:-1] + b',"extra":1}',
        lambda d: d.replace(b'"kind":"contribution",', b""),
        lambda d: d[:-1] + b',"tokens":5}',  # duplicate key
        lambda d: json.dumps(json.loads(d), sort_keys=False).encode(),
        lambda d: b"[]",
        lambda d: b"\xff",
    ],
)
def test_from_canonical_is_strict(mutate: Callable[[bytes], bytes]) -> None:
    data = make_record(1, "acme").canonical()
    with pytest.raises(RecordError):
        Record.from_canonical(mutate(data))


@pytest.mark.parametrize(
    ("field", "value"),
    [("tokens", -1), ("round", True), ("score", float("nan")), ("release_sha256", "AB" * 32),
     ("time", "2025-01-02T03:04:05"), ("time", "2025-01-02T03:04:05+01:00"), ("member", ""),
     ("dp_epsilon", -0.5)],
)  # fmt: skip
def test_record_rejects_bad_fields(field: str, value: object) -> None:
    good = make_record(1, "acme")
    with pytest.raises(RecordError, match=f"'{field}'"):
        Record(**{**asdict(good), field: value})


# ---------------------------------------------------------------- keys


def test_operator_key_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "op" / "operator_ed25519.pem"
    key = OperatorKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert OperatorKey.load_or_create(path).key_id == key.key_id
    assert key.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")
    path.chmod(0o644)
    with pytest.raises(OperatorKeyError, match="readable by others"):
        OperatorKey.load(path)
    with pytest.raises(OperatorKeyError, match="no operator key"):
        OperatorKey.load(tmp_path / "missing.pem")


# ---------------------------------------------------------------- the ledger file


@pytest.fixture
def key(tmp_path: Path) -> OperatorKey:
    return OperatorKey.load_or_create(tmp_path / "operator_ed25519.pem")


def _clock() -> Callable[[], str]:
    ticks = iter(range(10_000))
    return lambda: f"2025-01-01T00:00:{next(ticks) % 60:02d}.000000Z"


def build(path: Path, key: OperatorKey, rounds: int = ROUNDS) -> list[SignedTreeHead]:
    with Ledger(path, key, clock=_clock()) as ledger:
        return [
            ledger.append_round(
                [make_record(r, m, score=0.1 * (i + r)) for i, m in enumerate(MEMBERS)]
            )
            for r in range(1, rounds + 1)
        ]


def test_append_read_and_heads(tmp_path: Path, key: OperatorKey) -> None:
    path = tmp_path / "ledger.sqlite"
    heads = build(path, key)
    assert [h.size for h in heads] == [3, 6, 9, 12]
    with Ledger(path) as ledger:  # reopened, read-only use without the key
        records = ledger.records()
        assert [(r.round, r.member) for r in records[:4]] == [
            (1, "acme"),
            (1, "globex"),
            (1, "initech"),
            (2, "acme"),
        ]
        assert ledger.heads() == heads and ledger.latest_head() == heads[-1]
        assert ledger.latest_round() == ROUNDS
        assert heads[-1].root == root([r.canonical() for r in records]).hex()
        assert all(h.verify(key.public_key) for h in heads)
        with pytest.raises(LedgerError, match="without the operator key"):
            ledger.append_round([make_record(9, "acme")])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    report = verify(path, key.public_key_pem())
    assert report.ok and report.records == 12 and report.heads == 4


def test_append_refuses_replayed_mixed_or_empty_rounds(tmp_path: Path, key: OperatorKey) -> None:
    path = tmp_path / "ledger.sqlite"
    build(path, key, rounds=2)
    with Ledger(path, key) as ledger:
        with pytest.raises(LedgerError, match="round 2 is not after the ledger's latest round 2"):
            ledger.append_round([make_record(2, "acme")])
        with pytest.raises(LedgerError, match=r"span rounds \[3, 4\]"):
            ledger.append_round([make_record(3, "acme"), make_record(4, "acme")])
        with pytest.raises(LedgerError, match="no records"):
            ledger.append_round([])
        assert len(ledger.records()) == 6
    assert verify(path, key.public_key_pem()).ok


def test_heads_never_go_back_in_time(tmp_path: Path, key: OperatorKey) -> None:
    times = iter(["2025-06-01T00:00:00Z", "2025-01-01T00:00:00Z"])
    with Ledger(tmp_path / "l.sqlite", key, clock=lambda: next(times)) as ledger:
        first = ledger.append_round([make_record(1, "acme")])
        second = ledger.append_round([make_record(2, "acme")])
    assert second.time == first.time
    assert verify(tmp_path / "l.sqlite", key.public_key_pem()).ok


# ---------------------------------------------------------------- tampering, done with sqlite3 on the file


def _tamper(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def _data(path: Path, idx: int) -> tuple[bytes, str]:
    conn = sqlite3.connect(path)
    row = conn.execute("SELECT data, signature FROM records WHERE idx = ?", (idx,)).fetchone()
    conn.close()
    return bytes(row[0]), row[1]


def _shift_up(path: Path, start: int) -> list[tuple[str, tuple[object, ...]]]:
    """Statements that renumber records start.. to start+1.. (making room for an insert)."""
    return [
        ("UPDATE records SET idx = idx + 1000 WHERE idx >= ?", (start,)),
        ("UPDATE records SET idx = idx - 999 WHERE idx >= 1000", ()),
    ]


@pytest.fixture
def ledger_file(tmp_path: Path, key: OperatorKey) -> Path:
    path = tmp_path / "ledger.sqlite"
    build(path, key)
    return path


def test_untouched_ledger_verifies_clean(ledger_file: Path, key: OperatorKey) -> None:
    report = verify(ledger_file, key.public_key_pem())
    assert report.ok and report.problem is None and report.first_bad_index is None


def test_edited_record_is_named(ledger_file: Path, key: OperatorKey) -> None:
    data, _ = _data(ledger_file, 7)
    edited = re.sub(rb'"score":[^,]+', b'"score":9.0', data)
    assert edited != data
    _tamper(ledger_file, ("UPDATE records SET data = ? WHERE idx = 7", (edited,)))
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 7
    assert "record 7 (round 3, member 'globex')" in (report.problem or "")
    assert "\n" not in (report.problem or "")


def test_edited_record_into_non_canonical_bytes_is_named(
    ledger_file: Path, key: OperatorKey
) -> None:
    _tamper(ledger_file, ("UPDATE records SET data = ? WHERE idx = 4", (b"garbage",)))
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 4 and "edited" in (report.problem or "")


def test_deleted_record_is_named(ledger_file: Path, key: OperatorKey) -> None:
    _tamper(ledger_file, ("DELETE FROM records WHERE idx = 5", ()))
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 5 and "deleted" in (report.problem or "")


def test_deleted_and_renumbered_record_is_named(ledger_file: Path, key: OperatorKey) -> None:
    _tamper(
        ledger_file,
        ("DELETE FROM records WHERE idx = 5", ()),
        ("UPDATE records SET idx = idx + 1000 WHERE idx > 5", ()),
        ("UPDATE records SET idx = idx - 1001 WHERE idx >= 1000", ()),
    )
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 5
    assert "record 5 (round 3, member 'acme')" in (report.problem or "")


@pytest.mark.parametrize("with_signatures", [False, True])
def test_swapped_records_are_named(
    ledger_file: Path, key: OperatorKey, with_signatures: bool
) -> None:
    (a, sa), (b, sb) = _data(ledger_file, 3), _data(ledger_file, 8)
    if with_signatures:
        _tamper(
            ledger_file,
            ("UPDATE records SET data = ?, signature = ? WHERE idx = 3", (b, sb)),
            ("UPDATE records SET data = ?, signature = ? WHERE idx = 8", (a, sa)),
        )
    else:
        _tamper(
            ledger_file,
            ("UPDATE records SET data = ? WHERE idx = 3", (b,)),
            ("UPDATE records SET data = ? WHERE idx = 8", (a,)),
        )
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 3
    assert "record 3 (round 3, member 'initech')" in (report.problem or "")


def test_record_inserted_in_the_middle_is_named(ledger_file: Path, key: OperatorKey) -> None:
    forged = make_record(2, "mallory", score=100.0).canonical()
    _, signature = _data(ledger_file, 0)  # a genuine signature, but for position 0
    _tamper(
        ledger_file,
        *_shift_up(ledger_file, 6),
        ("INSERT INTO records (idx, data, signature) VALUES (6, ?, ?)", (forged, signature)),
    )
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 6
    assert "record 6 (round 2, member 'mallory')" in (report.problem or "")


@pytest.mark.parametrize("copy_of", [11, 2])
def test_record_inserted_at_the_end_is_named(
    ledger_file: Path, key: OperatorKey, copy_of: int
) -> None:
    data, signature = _data(ledger_file, copy_of)
    _tamper(
        ledger_file,
        ("INSERT INTO records (idx, data, signature) VALUES (12, ?, ?)", (data, signature)),
    )
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 12


def test_edited_head_root_is_named(ledger_file: Path, key: OperatorKey) -> None:
    _tamper(ledger_file, ("UPDATE heads SET root = ? WHERE size = 6", ("00" * 32,)))
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index is None and report.first_bad_head == 6
    assert "tree head of size 6" in (report.problem or "")


def test_deleted_last_head_leaves_records_uncovered(ledger_file: Path, key: OperatorKey) -> None:
    _tamper(ledger_file, ("DELETE FROM heads WHERE size = 12", ()))
    report = verify(ledger_file, key.public_key_pem())
    assert report.first_bad_index == 9 and "not covered" in (report.problem or "")


def test_wrong_public_key_fails(ledger_file: Path, tmp_path: Path) -> None:
    other = OperatorKey.load_or_create(tmp_path / "other.pem")
    report = verify(ledger_file, other.public_key_pem())
    assert not report.ok and "not by this public key" in (report.problem or "")


# ---------------------------------------------------------------- crash safety


def test_failure_mid_append_leaves_previous_state(
    ledger_file: Path, key: OperatorKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sign = OperatorKey.sign

    def sign_but_die_at_the_head(self: OperatorKey, message: bytes) -> bytes:
        if message.startswith(b"fedmoe-sth-v1"):  # records already inserted in the transaction
            raise RuntimeError("simulated crash")
        return real_sign(self, message)

    with Ledger(ledger_file, key) as ledger:
        before = (ledger.records(), ledger.heads())
        monkeypatch.setattr(OperatorKey, "sign", sign_but_die_at_the_head)
        with pytest.raises(RuntimeError, match="simulated crash"):
            ledger.append_round([make_record(5, m) for m in MEMBERS])
        monkeypatch.setattr(OperatorKey, "sign", real_sign)
        assert (ledger.records(), ledger.heads()) == before
        assert verify(ledger_file, key.public_key_pem()).ok
        ledger.append_round([make_record(5, m) for m in MEMBERS])  # the round can be appended again
    assert verify(ledger_file, key.public_key_pem()).records == 15


def test_process_killed_mid_append_leaves_previous_state(
    ledger_file: Path, key: OperatorKey, tmp_path: Path
) -> None:
    script = f"""
import os
from pathlib import Path
from server.ledger import Ledger, OperatorKey, Record
real = OperatorKey.sign
def sign(self, message):
    if message.startswith(b"fedmoe-sth-v1"):
        os._exit(9)  # no rollback, no close: as if the power went
    return real(self, message)
OperatorKey.sign = sign
ledger = Ledger(Path({str(ledger_file)!r}), OperatorKey.load(Path({str(tmp_path / "operator_ed25519.pem")!r})))
ledger.append_round([Record(5, "acme", 1.0, 1.0, 1, 1, 1, None, {SHA!r}, "2025-01-01T00:00:00Z")])
"""
    root_dir = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root_dir,
        env={**os.environ, "PYTHONPATH": str(root_dir)},
        check=False,
    )
    assert done.returncode == 9
    report = verify(ledger_file, key.public_key_pem())
    assert report.ok and report.records == 12 and report.heads == 4


# ---------------------------------------------------------------- member proofs


def test_member_proof_round_trip_offline(ledger_file: Path, key: OperatorKey) -> None:
    with Ledger(ledger_file) as ledger:
        first = ledger.heads()[0]
        proof = ledger.prove("globex", since_head=first)
    assert [e.index for e in proof.records] == [1, 4, 7, 10]
    text = proof.to_json()
    assert verify_member_proof(text, key.public_key_pem()) == []
    assert verify_member_proof(text.encode(), key.public_key_pem()) == []


def test_member_proof_without_since_head(ledger_file: Path, key: OperatorKey) -> None:
    with Ledger(ledger_file) as ledger:
        proof = ledger.prove("acme")
    assert proof.since is None and verify_member_proof(proof.to_json(), key.public_key_pem()) == []


def test_member_proof_tampering_is_caught(
    ledger_file: Path, key: OperatorKey, tmp_path: Path
) -> None:
    pem = key.public_key_pem()
    with Ledger(ledger_file) as ledger:
        obj = json.loads(ledger.prove("globex", since_head=ledger.heads()[1]).to_json())

    def problems(change: Callable[[dict[str, object]], None]) -> list[str]:
        copy = json.loads(json.dumps(obj))
        change(copy)
        return verify_member_proof(json.dumps(copy), pem)

    def inflate(o: dict) -> None:  # type: ignore[type-arg]
        o["records"][0]["record"] = re.sub(
            r'"score":[^,]+', '"score":9.0', o["records"][0]["record"]
        )

    assert any("inclusion proof does not match" in p for p in problems(inflate))
    assert any(
        "signature does not verify" in p
        for p in problems(lambda o: o["head"].update(root="00" * 32))
    )
    assert any("belongs to" in p for p in problems(lambda o: o.update(member="acme")))
    assert any("not a prefix" in p for p in problems(lambda o: o.update(consistency=[])))
    assert any("earlier tree head" in p for p in problems(lambda o: o["since"].update(size=4)))
    assert verify_member_proof("{not json", pem) != []
    other = OperatorKey.load_or_create(tmp_path / "other.pem")
    assert verify_member_proof(json.dumps(obj), other.public_key_pem()) != []


def test_rewritten_history_fails_consistency(tmp_path: Path, key: OperatorKey) -> None:
    """The operator rebuilds the log with an edited round 1: the member's saved head exposes it."""
    honest, forged = tmp_path / "honest.sqlite", tmp_path / "forged.sqlite"
    saved = build(honest, key, rounds=2)[0]
    with Ledger(forged, key, clock=_clock()) as ledger:
        ledger.append_round(
            [make_record(1, m, score=0.0 if m == "globex" else 0.5) for m in MEMBERS]
        )
        for r in (2, 3):
            ledger.append_round([make_record(r, m) for m in MEMBERS])
        proof = ledger.prove("globex", since_head=saved)
    assert any(
        "not a prefix" in p for p in verify_member_proof(proof.to_json(), key.public_key_pem())
    )
    with Ledger(honest) as ledger, pytest.raises(LedgerError, match="rolled back"):
        ledger.prove(
            "globex",
            since_head=SignedTreeHead(99, "00" * 32, saved.time, saved.signature, saved.key_id),
        )


def test_prove_unknown_member_or_empty_ledger(ledger_file: Path, tmp_path: Path) -> None:
    with (
        Ledger(ledger_file) as ledger,
        pytest.raises(LedgerError, match="no records of member 'nobody'"),
    ):
        ledger.prove("nobody")
    with Ledger(tmp_path / "empty.sqlite") as ledger, pytest.raises(LedgerError, match="empty"):
        ledger.prove("acme")


# ---------------------------------------------------------------- the `fedmoe ledger` sub-app


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(ledger_app, list(args))
    return result.exit_code, result.output


def test_cli_show_export_verify(ledger_file: Path, tmp_path: Path) -> None:
    key_path = str(tmp_path / "operator_ed25519.pem")
    code, out = _cli("show", "--ledger", str(ledger_file))
    assert code == 0 and "globex" in out and "latest signed tree head: size 12" in out
    code, out = _cli("verify", "--ledger", str(ledger_file), "--operator-key", key_path)
    assert code == 0 and "OK (12 records, 4 signed tree heads)" in out
    code, out = _cli("export", "--ledger", str(ledger_file), "--format", "csv")
    assert (
        code == 0
        and out.splitlines()[0].startswith("index,round,member,score")
        and len(out.splitlines()) == 13
    )
    code, _ = _cli(
        "export",
        "--ledger",
        str(ledger_file),
        "--format",
        "json",
        "--out",
        str(tmp_path / "e.json"),
    )
    exported = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and len(exported["records"]) == 12 and len(exported["heads"]) == 4
    code, out = _cli("export", "--ledger", str(ledger_file), "--format", "xml")
    assert code == 1 and "expected csv or json" in out
    code, out = _cli("show", "--ledger", str(tmp_path / "missing.sqlite"))
    assert code == 1 and "no ledger file" in out


def test_cli_verify_exits_1_on_tampered_ledger(ledger_file: Path, tmp_path: Path) -> None:
    pub = tmp_path / "operator.pub.pem"
    assert (
        _cli(
            "public-key",
            "--operator-key",
            str(tmp_path / "operator_ed25519.pem"),
            "--out",
            str(pub),
        )[0]
        == 0
    )
    _tamper(ledger_file, ("DELETE FROM records WHERE idx = 2", ()))
    code, out = _cli("verify", "--ledger", str(ledger_file), "--public-key", str(pub))
    assert code == 1 and "record 2" in out and "deleted" in out
    assert len(out.strip().splitlines()) == 1


def test_cli_prove_and_verify_proof_round_trip(
    ledger_file: Path, tmp_path: Path, key: OperatorKey
) -> None:
    pub = tmp_path / "operator.pub.pem"
    pub.write_bytes(key.public_key_pem())
    first = tmp_path / "first.json"
    code, _ = _cli(
        "prove", "--ledger", str(ledger_file), "--member", "initech", "--out", str(first)
    )
    assert code == 0
    # a later round, then a proof consistent with the head saved in the first proof
    with Ledger(ledger_file, key) as ledger:
        ledger.append_round([make_record(5, m) for m in MEMBERS])
    second = tmp_path / "second.json"
    code, _ = _cli("prove", "--ledger", str(ledger_file), "--member", "initech", "--since-head", str(first),
                   "--out", str(second))  # fmt: skip
    assert code == 0
    code, out = _cli("verify-proof", "--proof", str(second), "--public-key", str(pub))
    assert code == 0 and "5 records of 'initech'" in out and "earlier head of size 12" in out
    broken = json.loads(second.read_text())
    broken["records"][0]["index"] = 1
    second.write_text(json.dumps(broken))
    code, out = _cli("verify-proof", "--proof", str(second), "--public-key", str(pub))
    assert code == 1 and "inclusion proof does not match" in out
