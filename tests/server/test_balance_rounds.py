"""The consortium's expert load in the round loop: measured after each round, sent with the next
TRAIN, checked by the member; and how members share experts, in the manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client.app import app
from client.node import expert_load_of
from model.base import load_base
from model.io import tensors_from_bytes, tensors_to_bytes
from protos.messages import ProtocolError, TrainInstruction
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, SentTrain, task_identity


def config(ws: Workspace, **overrides: object) -> RunConfig:
    base = RunConfig(
        workspace=str(ws.root), num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="fp16", contribution="off",
    )
    return base.with_overrides(**overrides)


@pytest.mark.parametrize("secure", [False, True])
def test_the_load_of_a_round_is_sent_with_the_next_train(ws: Workspace, secure: bool) -> None:
    sent = SentTrain()
    extra = {"secagg": "on", "codec": "randk0.2+int8", "codec_clip": 0.05, "secagg_timeout": 5.0} if secure else {}
    with task_identity():
        run_rounds(FakeGrid(app, 3, before=sent), config(ws, **extra), LogReporter(), run_name="load")
    manifests = Checkpoints(ws.run_dir("load")).manifests()
    assert all(ins.expert_load == b"" and ins.balance == "consortium" for ins in sent.by_round[1])
    after_1 = torch.tensor(manifests[1]["expert_load"])
    layers, experts = after_1.shape
    assert (layers, experts) == (2, 8) and torch.allclose(after_1.sum(dim=1), torch.ones(layers))
    assert (after_1 > 0).sum() >= layers * 2  # top-2 routing reaches at least two experts a layer
    for ins in sent.by_round[2]:
        assert torch.equal(tensors_from_bytes(ins.expert_load, source="test")["load"], after_1)
        assert ins.balance_weight == pytest.approx(1 / 3)
    specialization = manifests[2]["specialization"]
    if secure:  # the operator sees sums only: how members share experts is not known to it
        assert specialization == {"expert_top_member_share": None, "routing_entropy": {}}
    else:
        assert 1 / 3 <= specialization["expert_top_member_share"] <= 1
        assert set(specialization["routing_entropy"]) == set(ws.members()[:3])
        assert all(0 < h <= 1 for h in specialization["routing_entropy"].values())


def test_a_member_refuses_an_expert_load_that_does_not_fit_its_model(tiny_base_path: Path) -> None:
    lora = load_base(tiny_base_path).with_lora()
    good = torch.full((2, 8), 1 / 8)
    ins = TrainInstruction(
        round=2, run="r", state=b"", state_kind="full", base_view_sha256="", view_sha256="", base_sha256="",
        base_path="", members_dir="", nodes_dir="", local_steps=1, batch_size=1, seq_len=8, lr=0.1, local_opt="adamw", seed=0,
        min_expert_tokens=0, codec="fp16", codec_clip=0.0, update_clip=0.0, codec_seed=0, precision="auto", secure=False,
        balance="consortium", expert_load=tensors_to_bytes({"load": good}), balance_weight=0.5, server_optimizer="",
    )
    assert torch.equal(expert_load_of(ins, lora), good)
    assert expert_load_of(dataclasses.replace(ins, balance="member"), lora) is None
    assert expert_load_of(dataclasses.replace(ins, expert_load=b""), lora) is None
    bad = {
        "expected float32 \\(2, 8\\)": {"expert_load": tensors_to_bytes({"load": torch.full((2, 4), 0.25)})},
        "summing to 1": {"expert_load": tensors_to_bytes({"load": torch.full((2, 8), 0.5)})},
        "non-negative": {"expert_load": tensors_to_bytes({"load": torch.tensor([[1.5, -0.5] + [0.0] * 6] * 2)})},
        "unreadable": {"expert_load": b"not safetensors"},
        "outside \\(0, 1\\]": {"balance_weight": 0.0},
        "unknown balance": {"balance": "global"},
    }
    for message, change in bad.items():
        with pytest.raises(ProtocolError, match=message):
            expert_load_of(dataclasses.replace(ins, **change), lora)
