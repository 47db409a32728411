"""A member whose frozen base is held in int8 (node config `base-quantization`) trains a round with
the others, who keep the base as it is, and its update is part of the aggregate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from client.app import app
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity

MEMBER = "legal"


def _round(ws: Workspace, quantization: str, run: str) -> tuple[dict[str, torch.Tensor], object]:
    config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=3, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=8, min_members=2, round_timeout=120.0, codec="fp16", contribution="off")
    grid = FakeGrid(app, len(ws.members()))
    node = 1000 + ws.members().index(MEMBER)
    grid.contexts[node].node_config["base-quantization"] = quantization
    with task_identity():
        [summary] = run_rounds(grid, config, LogReporter(), run_name=run)
    committed = Checkpoints(ws.run_dir(run)).load()
    assert committed is not None
    return committed.state, summary


def test_a_member_with_an_int8_base_trains_with_the_others_and_its_update_is_aggregated(ws: Workspace) -> None:
    from client.node import load_member_model
    from model.base import load_base

    start = load_member_model(ws.base, load_base(ws.base).sha256)[1].get_state()
    plain, _ = _round(ws, "none", "plain")
    quantized, summary = _round(ws, "int8", "int8")
    assert summary.rejected == {}
    [report] = [m for m in summary.members if m.member == MEMBER]
    assert "int8 base" in report.precision
    assert all("int8" not in m.precision for m in summary.members if m.member != MEMBER)

    def norm(state: dict[str, torch.Tensor]) -> float:
        return float(sum(((state[n] - start[n]) ** 2).sum() for n in start)) ** 0.5

    moved = norm(plain)
    apart = float(sum(((quantized[n] - plain[n]) ** 2).sum() for n in start)) ** 0.5
    # the int8 member's update differs a little from what the same member sends on the plain base;
    # had it been dropped from the aggregate, the rounds would differ by its whole part of the update
    assert 0 < apart < 0.1 * moved


def test_node_config_refuses_an_unknown_base_quantization(tmp_path) -> None:  # noqa: ANN001
    from client.node import Node

    hints = SimpleNamespace(base_path=str(tmp_path), members_dir=str(tmp_path), nodes_dir=str(tmp_path))
    node = Node.from_node_config({"data-path": str(tmp_path / "d"), "base-quantization": "nf4"}, hints)
    assert node.base_quantization == "nf4"
    with pytest.raises(ValueError, match="base-quantization 'int4'"):
        Node.from_node_config({"data-path": str(tmp_path / "d"), "base-quantization": "int4"}, hints)
