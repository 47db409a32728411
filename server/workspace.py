"""Where an embedded consortium keeps its files (one folder, made by `fedmoe init`).

    <workspace>/corpora/            general/, members/<member>/, validation/<domain>.jsonl
    <workspace>/base/               the frozen base model directory (model/base.py)
    <workspace>/runs/<run>/         committed rounds (server/checkpoint.py)
    <workspace>/nodes/<member>/     node-local state of each simulated member
    <workspace>/releases/<name>/    exported releases (server/release.py)
    <workspace>/operator/           the operator's Ed25519 key and usage-rights policy
    <workspace>/runs/<run>/ledger.sqlite   the run's transparency ledger (server/ledger/)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def corpora(self) -> Path:
        return self.root / "corpora"

    @property
    def members_dir(self) -> Path:
        return self.corpora / "members"

    @property
    def validation_dir(self) -> Path:
        return self.corpora / "validation"

    @property
    def general_dir(self) -> Path:
        return self.corpora / "general"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def run_dir(self, name: str = "default") -> Path:
        return self.root / "runs" / name

    @property
    def operator_dir(self) -> Path:
        return self.root / "operator"

    @property
    def operator_key(self) -> Path:
        return self.operator_dir / "operator_ed25519.pem"

    @property
    def policy(self) -> Path:
        return self.operator_dir / "policy.toml"

    def ledger(self, run: str = "default") -> Path:
        return self.run_dir(run) / "ledger.sqlite"

    def node_dir(self, member: str) -> Path:
        return self.root / "nodes" / member

    def release_dir(self, name: str) -> Path:
        return self.root / "releases" / name

    def members(self) -> list[str]:
        if not self.members_dir.is_dir():
            return []
        return sorted(p.name for p in self.members_dir.iterdir() if p.is_dir())

    def validation_domains(self) -> list[str]:
        if not self.validation_dir.is_dir():
            return []
        return sorted(p.stem for p in self.validation_dir.glob("*.jsonl"))
