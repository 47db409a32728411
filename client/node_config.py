"""Who a member's node is and where its data and state live, read from its node config (a
SuperNode) or its partition (a simulated node).

Kept apart from client/node.py, the round's work: on a SuperNode every message starts a fresh
ClientApp process, and one that answers a secure-aggregation stage or a hello needs only this,
not the training stack (transformers, peft), whose import takes seconds per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from model.corpus import DataError
from model.member_data import TEXT
from model.quantize import QUANTIZATIONS
from privacy.dp import DPConfig


class NodeHints(Protocol):
    """Where a simulated node finds things (TRAIN and secure-aggregation messages carry them)."""

    base_path: str
    members_dir: str
    nodes_dir: str


@dataclass(frozen=True)
class Node:
    member: str
    data_path: Path
    state_dir: Path
    base_path: Path
    device: str = "auto"
    roster: Path | None = None  # a SuperNode: the consortium's roster.json (client/secure.py)
    ca: Path | None = None  # a SuperNode: the consortium CA that signed the roster
    secagg_min_group: int = 2  # the smallest survivor list this member signs
    data_column: str = TEXT  # the plain-text field of .jsonl/.json/.csv/.parquet records
    data_pipeline: bool = False  # model/quality.py: duplicates and junk dropped, a curriculum
    curriculum_levels: int = 1  # difficulty levels opened one by one over the rounds (1: none)
    base_quantization: str = "none"  # model/quantize.py: the frozen base held in int8 or nf4 here
    dp: DPConfig | None = None  # record-level DP-SGD (node config `dp-*`, privacy/dp.py); None: off

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], ins: NodeHints) -> Node:
        """`_from_node_config`, with the member's choice of base quantization (either kind of node)."""
        node = cls._from_node_config(node_config, ins)
        quantization = str(node_config.get("base-quantization", "none"))
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"node config base-quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
        return replace(node, base_quantization=quantization)

    @classmethod
    def _from_node_config(cls, node_config: Mapping[str, object], ins: NodeHints) -> Node:
        """A SuperNode names its data explicitly; a simulated node is a partition of the demo."""
        if "data-path" in node_config:
            data = Path(str(node_config["data-path"]))
            member = str(node_config.get("member", data.name))
            state = Path(str(node_config.get("state-dir", data.parent / f".fedmoe-{member}")))
            base = Path(str(node_config.get("base-path", ins.base_path)))
            roster = Path(str(node_config.get("roster", state / "roster.json")))
            raw = node_config.get("secagg-min-group", 3)
            min_group = int(str(raw)) if str(raw).isdigit() and not isinstance(raw, bool) else 0
            if min_group < 2:
                raise ValueError(f"node config secagg-min-group {raw!r}: must be an integer >= 2")
            ca = Path(str(node_config["ca"])) if "ca" in node_config else None
            column = str(node_config.get("data-column", TEXT))
            pipeline = str(node_config.get("data-pipeline", "off"))
            levels = str(node_config.get("curriculum-levels", "1"))
            if pipeline not in ("on", "off") or not levels.isdigit() or not 1 <= int(levels) <= 10:
                raise ValueError(f"node config data-pipeline {pipeline!r} / curriculum-levels {levels!r}: expected on/off and 1-10")
            return cls(member, data, state, base, str(node_config.get("device", "auto")), roster, ca, min_group, column,
                       pipeline == "on", int(levels), dp=DPConfig.from_node_config(node_config))
        members = sorted(p.name for p in Path(ins.members_dir).iterdir() if p.is_dir())
        partition = int(node_config["partition-id"])  # type: ignore[arg-type]
        if partition >= len(members):
            raise DataError(f"{ins.members_dir}: no member data for simulated node {partition} ({len(members)} members)")
        member = members[partition]
        return cls(member, Path(ins.members_dir) / member, Path(ins.nodes_dir) / member, Path(ins.base_path),
                   dp=DPConfig.from_node_config(node_config))
