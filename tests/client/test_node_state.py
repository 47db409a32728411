"""A member's state dir under faults: damaged caches are rebuilt with one warning line, never
fatal; the records secure aggregation needs are refused safely, naming the file; keys are
written whole (temp, fsync, link into place) or not at all."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import client.node as node_module
from client import secure
from client.node import Node, StaleView, compress_update, member_blocks, receive_state, view_path
from model.io import save_tensors, tensors_to_bytes
from privacy.certs import CertError
from privacy.roster import identity_key
from privacy.secagg import ProtocolViolation

SEQ = 8
GARBAGE = b"\x00\x01 not a safetensors file"


def _node(tmp_path: Path) -> Node:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "notes.txt").write_text("some private text of the member\n")
    return Node("acme", data, tmp_path / "state", tmp_path / "base")


def _packed() -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.arange(3 * SEQ, dtype=torch.long).view(3, SEQ)
    return blocks, blocks.clone()


def _one_warning(caplog: pytest.LogCaptureFixture, path: Path) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0] and str(path) in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no labels", "other seq_len"])
def test_a_damaged_token_cache_is_rebuilt_with_one_warning(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    node = _node(tmp_path)
    packs: list[int] = []
    monkeypatch.setattr(node_module, "pack_documents", lambda *a, **k: packs.append(1) or _packed())
    base: Any = SimpleNamespace(sha256="0" * 64, tokenizer=None)
    first = member_blocks(node, base, SEQ)
    (cache,) = node.state_dir.glob("tokens-*.safetensors")
    good = cache.read_bytes()
    damaged = {
        "garbage": GARBAGE,
        "truncated": good[: len(good) // 2],
        "no labels": tensors_to_bytes({"blocks": first[0]}),
        "other seq_len": tensors_to_bytes({"blocks": first[0].view(-1, 4), "labels": first[1].view(-1, 4)}),
    }[damage]
    cache.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="fedmoe.client"):
        again = member_blocks(node, base, SEQ)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]) and len(packs) == 2
    assert "rebuilding" in _one_warning(caplog, cache)
    assert cache.read_bytes() == good  # rewritten whole: the next round reads it without a warning
    caplog.clear()
    member_blocks(node, base, SEQ)
    assert len(packs) == 2 and not caplog.records


def _ins(rnd: int, **kw: Any) -> Any:
    return SimpleNamespace(codec="int8", codec_clip=0.0, run="default", round=rnd, codec_seed=7, **kw)


@pytest.mark.parametrize("damage", ["garbage", "nan"])
def test_a_damaged_error_feedback_residual_starts_from_zero(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    node = _node(tmp_path)
    delta = {"w": torch.linspace(-1, 1, 300).view(30, 10)}
    compress_update(delta, _ins(1), node, seed=1)
    (residual,) = (node.state_dir / "error-feedback").rglob("*round-00001.safetensors")
    if damage == "garbage":
        residual.write_bytes(GARBAGE)
    else:
        save_tensors(residual, {"w": torch.full((30, 10), float("nan"))})
    with caplog.at_level(logging.WARNING, logger="fedmoe.client"):
        payload = compress_update(delta, _ins(2), node, seed=1)
    assert "from zero" in _one_warning(caplog, residual)
    fresh = _node(tmp_path / "fresh")  # what a member with no residual at all sends
    assert payload == compress_update(delta, _ins(2), fresh, seed=1)


def test_a_damaged_view_asks_for_the_full_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = _node(tmp_path)
    path = view_path(node, "default")
    path.parent.mkdir(parents=True)
    path.write_bytes(GARBAGE)
    ins = _ins(3, state=tensors_to_bytes({"w": torch.zeros(2)}), state_kind="patch", server_optimizer="",
               base_view_sha256="0" * 64, view_sha256="0" * 64)
    with caplog.at_level(logging.WARNING, logger="fedmoe.client"), pytest.raises(StaleView, match="unreadable"):
        receive_state(ins, node)  # the server answers a StaleView with the full view
    _one_warning(caplog, path)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"view x": "acme"}'])
def test_a_damaged_unmask_record_refuses_to_unmask_naming_the_file(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "secagg" / "revealed.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ProtocolViolation) as refused:
        secure._check_reveal(tmp_path, "acme", "view x round 3 seed 0", ["acme", "globex"])
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "cannot be rebuilt" in message, message
    assert path.read_bytes() == content  # never overwritten: it is the member's only record


# ---------------------------------------------------------------- the identity key


def test_the_identity_key_is_fsynced_before_it_is_linked_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "link", lambda a, b, **k: events.append("link") or real_link(a, b, **k))
    path = tmp_path / "state" / "identity-ed25519.pem"
    key = identity_key(path)
    assert events[:2] == ["fsync", "link"] and events.count("fsync") >= 2  # the file, then the folder
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert identity_key(path).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_a_full_disk_leaves_no_torn_identity_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    path = tmp_path / "state" / "identity-ed25519.pem"
    with pytest.raises(CertError) as failed:
        identity_key(path)
    message = str(failed.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message, message
    assert list(path.parent.iterdir()) == []  # neither a torn key nor a temp file
    monkeypatch.undo()
    identity_key(path)  # space again: the key is made whole


def test_a_damaged_identity_key_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "identity-ed25519.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntorn")
    with pytest.raises(CertError) as refused:
        identity_key(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert path.read_bytes() == b"-----BEGIN PRIVATE KEY-----\ntorn"  # not replaced: the roster registers it
    with pytest.raises(ValueError, match="not a readable PEM"):
        secure.identity_key(tmp_path)  # the node's view of it: same line


def test_a_damaged_metrics_file_restarts_the_counters_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.metrics import METRICS_FILE, record_round

    path = tmp_path / METRICS_FILE
    path.write_bytes(b'{"rounds_trained": 4,')
    with caplog.at_level(logging.WARNING, logger="fedmoe.client"):
        totals = record_round(tmp_path, member="acme", round=5, num_tokens=10, seconds=1.0, local_steps=2,
                              train_loss=1.0, precision="fp32")
    assert totals["rounds_trained"] == 1 and "restarting" in _one_warning(caplog, path)
