"""The round journal: what secure aggregation decoded, made durable before the round commits.

A group's sum is unmasked once: every member remembers the survivor list it helped unmask and
refuses to help unmask the same update for another list (client/secure.py). A crash between the
unmasking and the commit used to leave a round that could only finish with exactly the same
survivors, so a member gone for good stalled the consortium. Now the decoded group sums, the
members' reports and the rejections are journaled right after the secure stages (written to a
temporary file, fsync'd, renamed); a restarted run that finds the journal of the round it is
about to run, written from the state it resumed at, finishes that round from the journal without
asking any member again, and no group sum is ever unmasked twice. The journal goes once the
round is committed.

    <run>/journal/round-0003.safetensors   each group's sum: "{g}|{tensor name}"
    <run>/journal/round-0003.json          the groups' members and weights, reports, rejections,
                                           the digest of the state the round started from
The JSON is written last: a journal without it is an interrupted write, ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.io import atomic_write_bytes, atomic_write_json, load_tensors, tensors_to_bytes
from server.summary import MemberReport
from server.validate import Received

Sums = tuple[dict[str, torch.Tensor], dict[str, float]]


class JournalError(RuntimeError):
    """A journal that does not read back as the round it names."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The digest a checkpoint gives this state (server/checkpoint.py: fp32 safetensors)."""
    return hashlib.sha256(tensors_to_bytes(state, torch.float32)).hexdigest()


@dataclass(frozen=True)
class Journaled:
    received: Received
    group_sums: dict[frozenset[str], Sums]


class Journal:
    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "journal"

    def _paths(self, rnd: int) -> tuple[Path, Path]:
        stem = self.folder / f"round-{rnd:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def write(self, rnd: int, from_state: str, received: Received, group_sums: dict[frozenset[str], Sums]) -> None:
        tensors_path, meta_path = self._paths(rnd)
        self.folder.mkdir(parents=True, exist_ok=True)
        groups = sorted(group_sums.items(), key=lambda kv: sorted(kv[0]))
        tensors = {f"{g}|{name}": t for g, (_, (sums, _w)) in enumerate(groups) for name, t in sums.items()}
        atomic_write_bytes(tensors_path, tensors_to_bytes(tensors))
        atomic_write_json(meta_path, {
            "round": rnd, "from_state_sha256": from_state,
            "groups": [{"members": sorted(members), "weights": weights} for members, (_s, weights) in groups],
            "reports": [asdict(r) for r in received.reports], "rejected": received.rejected,
        })

    def read(self, rnd: int, from_state: str) -> Journaled | None:
        """The journal of round `rnd` if it was written from `from_state`; None if there is none
        (or it is of an attempt from another state, which cannot be the round to finish)."""
        tensors_path, meta_path = self._paths(rnd)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_tensors(tensors_path)
            if meta["round"] != rnd:
                raise JournalError(f"names round {meta['round']}")
            if meta["from_state_sha256"] != from_state:
                return None
            group_sums: dict[frozenset[str], Sums] = {}
            for g, group in enumerate(meta["groups"]):
                sums = {k.split("|", 1)[1]: t for k, t in tensors.items() if k.split("|", 1)[0] == str(g)}
                group_sums[frozenset(group["members"])] = (sums, {k: float(v) for k, v in group["weights"].items()})
            reports = [MemberReport(**r) for r in meta["reports"]]
            return Journaled(Received(reports=reports, rejected=dict(meta["rejected"])), group_sums)
        except (OSError, ValueError, KeyError, TypeError, JournalError) as exc:
            raise JournalError(f"{meta_path}: unreadable journal ({exc}); move it aside to re-run the round") from None

    def clear(self, rnd: int) -> None:
        for path in self._paths(rnd):
            path.unlink(missing_ok=True)
