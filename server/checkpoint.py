"""Committed rounds: the global trainable state and a JSON manifest per round, written atomically.

    <run>/round-0003/state.safetensors   global trainable state after round 3 (fp32)
    <run>/round-0003/manifest.json       what happened in round 3 (members, losses, bytes, ...)
    <run>/round-0003/view.safetensors    the view of the global state members trained from in
                                         round 3 (aggregation/broadcast.py); resumes continue it
    <run>/round-0003/optimizer.safetensors  the server optimizer's state after round 3
                                         (aggregation/server_opt.py; absent for plain fedavg)
    <run>/COMMITTED                      {"round": 3, "sha256": ...}, replaced last
    <run>/run.lock                       held (flock) by the one process running the run's rounds

A round is committed when COMMITTED names it; a crash before that leaves the previous round
committed and the half-written folder is overwritten when the round is run again. A write the
disk refuses (ENOSPC, EIO) is a one-line CheckpointError naming the round that stays committed.

One process at a time runs a run's rounds (`hold_run`): a second ServerApp submitted on the same
run while the first still runs (an operator who thinks the first has hung) stops before it
writes anything. The kernel drops the lock when its holder dies, SIGKILL included, so a restart
after a crash never finds a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.io import atomic_write_bytes, atomic_write_json, tensors_from_bytes, tensors_to_bytes
from server.faults import kill_point

log = logging.getLogger("fedmoe.server")

POINTER = "COMMITTED"
LOCK = "run.lock"


class CheckpointError(RuntimeError):
    """A committed round cannot be read back as it was written."""


class RunBusy(CheckpointError):
    """Another process is running this run's rounds."""


@contextmanager
def hold_run(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock while the block runs; RunBusy at once if another process holds it.

    `run_dir` is <workspace>/runs/<run>: a workspace folder that does not exist is left to the
    run's own check (nothing is created in it). A filesystem without flock (some NFS, Lustre or
    FUSE mounts) runs unlocked, with a warning; on NFS the lock holds on one host only."""
    if not run_dir.parent.parent.is_dir():
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CheckpointError(f"{run_dir}: cannot open the run's lock file ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusy(f"{run_dir}: another process (pid {holder}) is running this run; stop it (`flwr stop` "
                          "takes up to a heartbeat, about 30 s) or let it finish before you run it again") from None
        except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this filesystem
            log.warning("%s: running without the run lock (%s): make sure no other process runs this run",
                        run_dir, exc.strerror)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Committed:
    round: int
    state: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    view: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


class Checkpoints:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def round_dir(self, rnd: int) -> Path:
        return self.run_dir / f"round-{rnd:04d}"

    def commit(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        *,
        view: dict[str, torch.Tensor] | None = None,
        optimizer: dict[str, torch.Tensor] | None = None,
    ) -> str:
        """Commit round `rnd`; returns the sha256 of the committed state.

        CheckpointError when the disk refuses a write: every file is replaced atomically and
        COMMITTED last, so the round committed before stays committed, whole."""
        try:
            return self._commit(rnd, state, manifest, view, optimizer)
        except OSError as exc:
            try:
                kept = self.latest_round()
            except (OSError, ValueError, KeyError, TypeError):
                kept = None
            reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
            stays = f"round {kept} stays committed" if kept is not None else "nothing is committed yet"
            raise CheckpointError(f"{self.round_dir(rnd)}: cannot commit round {rnd} ({reason}); {stays}") from None

    def _commit(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        view: dict[str, torch.Tensor] | None,
        optimizer: dict[str, torch.Tensor] | None,
    ) -> str:
        payload = tensors_to_bytes(state, torch.float32)
        digest = hashlib.sha256(payload).hexdigest()
        folder = self.round_dir(rnd)
        atomic_write_bytes(folder / "state.safetensors", payload)
        view_digest = None
        if view is not None:
            view_payload = tensors_to_bytes(view, torch.float32)
            view_digest = hashlib.sha256(view_payload).hexdigest()
            atomic_write_bytes(folder / "view.safetensors", view_payload)
        optimizer_digest = None
        if optimizer:
            optimizer_payload = tensors_to_bytes(optimizer)  # moments fp32, step counts int64
            optimizer_digest = hashlib.sha256(optimizer_payload).hexdigest()
            atomic_write_bytes(folder / "optimizer.safetensors", optimizer_payload)
        atomic_write_json(
            folder / "manifest.json",
            {**manifest, "round": rnd, "state_sha256": digest, "view_sha256": view_digest,
             "optimizer_sha256": optimizer_digest},
        )
        if rnd:  # round 0, the run's starting state, holds nothing of a round to lose
            kill_point("mid-commit")
        atomic_write_json(self.run_dir / POINTER, {"round": rnd, "sha256": digest})
        return digest

    def latest_round(self) -> int | None:
        pointer = self.run_dir / POINTER
        if not pointer.is_file():
            return None
        return int(json.loads(pointer.read_text())["round"])

    def load(self, rnd: int | None = None) -> Committed | None:
        pointer = self.run_dir / POINTER
        if not pointer.is_file():
            return None
        head = json.loads(pointer.read_text())
        rnd = head["round"] if rnd is None else rnd
        folder = self.round_dir(rnd)
        payload = (folder / "state.safetensors").read_bytes()
        manifest = json.loads((folder / "manifest.json").read_text())
        if hashlib.sha256(payload).hexdigest() != manifest["state_sha256"]:
            raise CheckpointError(f"{folder / 'state.safetensors'}: sha256 does not match its manifest")
        view = None
        if manifest.get("view_sha256"):
            view_payload = (folder / "view.safetensors").read_bytes()
            if hashlib.sha256(view_payload).hexdigest() != manifest["view_sha256"]:
                raise CheckpointError(f"{folder / 'view.safetensors'}: sha256 does not match its manifest")
            view = tensors_from_bytes(view_payload, source=str(folder))
        optimizer = {}
        if manifest.get("optimizer_sha256"):
            optimizer_payload = (folder / "optimizer.safetensors").read_bytes()
            if hashlib.sha256(optimizer_payload).hexdigest() != manifest["optimizer_sha256"]:
                raise CheckpointError(f"{folder / 'optimizer.safetensors'}: sha256 does not match its manifest")
            optimizer = tensors_from_bytes(optimizer_payload, source=str(folder))
        return Committed(rnd, tensors_from_bytes(payload, source=str(folder)), manifest, view, optimizer)

    def manifests(self) -> list[dict[str, Any]]:
        latest = self.latest_round()
        if latest is None:
            return []
        return [json.loads((self.round_dir(r) / "manifest.json").read_text()) for r in range(latest + 1)]
