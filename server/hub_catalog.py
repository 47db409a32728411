"""What the hub serves: the base model and the exported releases of one run, as signed manifests.

    round 0          the workspace's base/ folder (what `fedmoe join --hub` fetches)
    round N >= 1     <workspace>/releases/<run>-round-<N>/ (server/release.py): every round the
                     run has committed, exported from its checkpoint the first time a member
                     asks for it (or by `fedmoe export` before); a folder whose release.json
                     names another state (an earlier run under the same name) is exported again

Publication is lazy so that the round loop spends no time and the operator's disk no space on
releases nobody pulls (a release is the base, the adapter and the merged model: 79 MB for the
demo's base, per round); the first pull of a round waits for its export (seconds).

A manifest lists every file of the folder (path relative to it, size, sha256), the base's
sha256, the adapter's config, the round, the run and the ledger's latest signed tree head (its
sha256 and size: the release is tied to the contribution record it was published under), and is
signed with the operator's Ed25519 key (privacy/hub_auth.sign_manifest). Manifests are built
once per folder and rebuilt when the folder's release.json (or the base's manifest) changes.
A download may name only a path its manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from model.base import MANIFEST
from model.io import sha256_file
from privacy.hub_auth import key_id, sign_manifest
from server.checkpoint import Checkpoints
from server.ledger import Ledger, LedgerError, OperatorKey
from server.release import export_release
from server.workspace import Workspace

FORMAT = "fedmoe-release-v1"
RELEASE_INFO = "release.json"


class CatalogError(LookupError):
    """No such release, or no such file in it."""


@dataclass(frozen=True)
class Published:
    round: int
    folder: Path
    files: dict[str, tuple[int, str]]  # relative path -> (size, sha256)
    manifest_json: bytes
    signature: bytes
    stamp: tuple[str, float]  # (marker file, its mtime) the manifest was built from

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


class Catalog:
    """The releases of `run` in workspace `ws`, signed with `key`. Thread-safe."""

    def __init__(self, ws: Workspace, run: str, key: OperatorKey) -> None:
        self.ws, self.run, self.key = ws, run, key
        self.checkpoints = Checkpoints(ws.run_dir(run))
        self._cache: dict[int, Published] = {}
        self._exporting = threading.Lock()
        self._lock = threading.Lock()

    def folders(self) -> dict[int, Path]:
        """Round -> folder: the base and every round the run has committed (its folder may not be
        exported yet). Folders of other rounds (a run started over) are never served."""
        out = {0: self.ws.base} if (self.ws.base / MANIFEST).is_file() else {}
        for rnd in range(1, (self.checkpoints.latest_round() or 0) + 1):
            out[rnd] = self.ws.release_dir(f"{self.run}-round-{rnd}")
        return out

    def current(self, rnd: int, folder: Path) -> bool:
        """Whether `folder` holds round `rnd`'s release of the committed state (not an older
        run's export under the same name)."""
        if rnd == 0:
            return (folder / MANIFEST).is_file()
        try:
            info = json.loads((folder / RELEASE_INFO).read_text())
            committed = json.loads((self.checkpoints.round_dir(rnd) / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and info.get("state_sha256") == committed.get("state_sha256") is not None

    def exported(self, rnd: int) -> Published | None:
        """The release if its folder is current, without exporting it."""
        folder = self.folders().get(rnd)
        if folder is None or not self.current(rnd, folder):
            return None
        return self.get(rnd)

    def latest_round(self) -> int:
        return max(self.folders(), default=0)

    def get(self, rnd: int) -> Published:
        folder = self.folders().get(rnd)
        if folder is None:
            raise CatalogError(f"no release of round {rnd} in run {self.run!r}" if rnd else "the hub has no base model yet")
        if not self.current(rnd, folder):
            self._export(rnd, folder)
        marker = folder / (MANIFEST if rnd == 0 else RELEASE_INFO)
        stamp = (str(marker), marker.stat().st_mtime)
        with self._lock:
            cached = self._cache.get(rnd)
            if cached is not None and cached.stamp == stamp and cached.folder == folder:
                return cached
        published = self._publish(rnd, folder, stamp)
        with self._lock:
            self._cache[rnd] = published
        return published

    def _export(self, rnd: int, folder: Path) -> None:
        """Write a committed round's release; one export at a time (each loads the base and merges:
        many at once would only compete for the operator's memory), others wait for it."""
        with self._exporting:
            if self.current(rnd, folder):
                return  # another call exported it meanwhile
            committed = self.checkpoints.load(rnd)
            if committed is None:
                raise CatalogError(f"round {rnd} of run {self.run!r} is not committed")
            export_release(self.ws.base, committed.state, folder, round=rnd, val_loss=committed.manifest.get("val_loss"))

    def file(self, rnd: int, path: str) -> tuple[Path, int, str]:
        """(absolute path, size, sha256) of a file the release's manifest lists."""
        published = self.get(rnd)
        if path not in published.files:
            raise CatalogError(f"release of round {rnd} has no file {path[:200]!r}")
        size, digest = published.files[path]
        return published.folder / path, size, digest

    def _publish(self, rnd: int, folder: Path, stamp: tuple[str, float]) -> Published:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            files[path.relative_to(folder).as_posix()] = (path.stat().st_size, sha256_file(path))
        adapter = folder / "adapter" / "adapter_config.json"
        info = json.loads((folder / RELEASE_INFO).read_text()) if rnd else {}
        base_sha = info.get("base_sha256", "") if rnd else files[MANIFEST][1]  # a base's id: its manifest's sha256
        manifest = {
            "format": FORMAT, "run": self.run, "round": rnd, "base_sha256": base_sha,
            "files": [{"path": p, "size": s, "sha256": d} for p, (s, d) in files.items()],
            "adapter_config": json.loads(adapter.read_text()) if adapter.is_file() else None,
            "operator_key_id": key_id(self.key.public_key_pem()),
            **self._ledger_head(),
        }
        raw, signature = sign_manifest(manifest, self.key.sign)
        return Published(rnd, folder, files, raw, signature, stamp)

    def _ledger_head(self) -> dict[str, object]:
        path = self.ws.ledger(self.run)
        if not path.is_file():
            return {"ledger_head_sha256": None, "ledger_size": 0}
        try:
            with Ledger(path, create=False) as ledger:
                head = ledger.latest_head()
        except LedgerError:
            return {"ledger_head_sha256": None, "ledger_size": 0}
        if head is None:
            return {"ledger_head_sha256": None, "ledger_size": 0}
        canonical = json.dumps(head.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return {"ledger_head_sha256": hashlib.sha256(canonical).hexdigest(), "ledger_size": head.size}
