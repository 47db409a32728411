"""A full disk during commit or ledger append: one clear line, and the committed state is intact.

The disk is simulated: for checkpoints, file writes that fail with ENOSPC once a byte budget is
spent (at every file boundary of a commit); for the ledger, SQLite's own page limit, which makes
it fail exactly as on a full disk (SQLITE_FULL, "database or disk is full").
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from server.checkpoint import POINTER, CheckpointError, Checkpoints
from server.config import RunConfig
from server.ledger import Ledger, LedgerError, OperatorKey, Record, verify
from server.ledger_sync import record_in_ledger


class FullDisk:
    """Stands in for os.fdopen: files whose writes fail with ENOSPC once `free` bytes are written."""

    def __init__(self, free: int) -> None:
        self.free, self.written = free, [0]
        self._fdopen = os.fdopen

    def __call__(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        return _Limited(self._fdopen(fd, *args, **kwargs), self)


class _Limited:
    def __init__(self, f: Any, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data: bytes) -> int:
        if len(data) > self._disk.free:
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= len(data)
        self._disk.written.append(self._disk.written[-1] + len(data))
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.lora_B": torch.randn(64, 4, generator=g), "router.weight": torch.randn(8, 16, generator=g)}


def _commit_round_2(run: Path) -> str:
    return Checkpoints(run).commit(2, _state(2), {"val_loss": {"a": 1.0}}, view=_state(3), optimizer={"m": torch.ones(4)})


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_commit_that_runs_out_of_disk_keeps_the_previous_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    committed = tmp_path / "committed"
    Checkpoints(committed).commit(1, _state(1), {"val_loss": {"a": 2.0}})
    before = _tree(committed)

    probe = FullDisk(free=1 << 30)  # how many bytes a commit of round 2 writes, file by file
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", probe)
        _commit_round_2(tmp_path / "probe")
    boundaries = probe.written  # 0, end of state, view, optimizer, manifest, COMMITTED
    assert len(boundaries) == 6

    for free in [b for end in boundaries[1:] for b in (end - 1, end)][:-1]:  # in each file and between them
        run = tmp_path / f"free-{free}"
        shutil.copytree(committed, run)
        with monkeypatch.context() as patch:
            patch.setattr(os, "fdopen", FullDisk(free))
            with pytest.raises(CheckpointError) as failed:
                _commit_round_2(run)
        message = str(failed.value)
        assert "\n" not in message and "round-0002" in message and "No space left on device" in message, message
        assert "round 1 stays committed" in message
        back = Checkpoints(run).load()
        assert back is not None and back.round == 1 and torch.equal(back.state["router.weight"], _state(1)["router.weight"])
        assert not list(run.rglob("*.tmp")), f"free={free}: a temp file was left"
        assert {k: v for k, v in _tree(run).items() if not k.startswith("round-0002")} == before


def test_a_first_commit_that_runs_out_of_disk_says_nothing_is_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fdopen", FullDisk(0))
    with pytest.raises(CheckpointError, match=r"cannot commit round 0 \(No space left on device\); nothing is committed yet"):
        Checkpoints(tmp_path).commit(0, _state(0), {})
    assert not (tmp_path / POINTER).exists()


# ---------------------------------------------------------------- the ledger


def _records(rnd: int, n: int) -> list[Record]:
    return [Record(round=rnd, member=f"m{i:03d}", score=0.0, share=0.0, tokens=1, bytes_up=1, bytes_down=1,
                   dp_epsilon=None, release_sha256="ab" * 32, time="2025-01-01T00:00:00.000000Z") for i in range(n)]


def _fill(ledger: Ledger) -> None:
    """No page left: SQLite now fails a growing write as on a full disk (SQLITE_FULL)."""
    pages = ledger._conn.execute("PRAGMA page_count").fetchone()[0]
    ledger._conn.execute(f"PRAGMA max_page_count={pages}")


def test_a_ledger_append_on_a_full_disk_names_the_file_and_keeps_earlier_rounds(tmp_path: Path) -> None:
    key = OperatorKey.load_or_create(tmp_path / "operator.pem")
    path = tmp_path / "ledger.sqlite"
    with Ledger(path, key) as ledger:
        head = ledger.append_round(_records(1, 3))
        _fill(ledger)
        with pytest.raises(LedgerError) as failed:
            ledger.append_round(_records(2, 400))
        message = str(failed.value)
        assert "\n" not in message and str(path) in message and "cannot append round 2" in message, message
        assert "full" in message  # SQLite's own words: "database or disk is full"
        assert ledger.latest_round() == 1 and ledger.latest_head() == head
    report = verify(path, key.public_key_pem())
    assert report.ok and report.records == 3 and report.heads == 1
    with Ledger(path, key) as ledger:  # space again: the next append goes through
        ledger.append_round(_records(2, 400))
    assert verify(path, key.public_key_pem()).ok


def test_a_committed_round_the_full_ledger_refused_enters_it_on_resume(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "run")
    members = [{"member": f"m{i:03d}", "num_tokens": 10, "bytes_up": 5, "bytes_down": 7} for i in range(300)]
    time = "2025-01-01T00:00:00.000000Z"
    checkpoints.commit(0, _state(0), {"members": [], "time": time})
    checkpoints.commit(1, _state(1), {"members": members[:1], "time": time})
    key = OperatorKey.load_or_create(tmp_path / "operator.pem")
    path = tmp_path / "run" / "ledger.sqlite"
    with Ledger(path, key) as ledger:
        record_in_ledger(ledger, checkpoints, RunConfig())  # round 1
        checkpoints.commit(2, _state(2), {"members": members, "time": time})
        _fill(ledger)
        with pytest.raises(LedgerError, match=r"round 2 is committed and enters the ledger when the run resumes"):
            record_in_ledger(ledger, checkpoints, RunConfig())
        assert ledger.latest_round() == 1
    with Ledger(path, key) as ledger:
        record_in_ledger(ledger, checkpoints, RunConfig())
        assert ledger.latest_round() == 2
    assert verify(path, key.public_key_pem()).ok
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
