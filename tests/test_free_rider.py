"""The demo's free rider passes the server's reply checks (it tries to look honest) and sends noise."""

from __future__ import annotations

from pathlib import Path

import torch

from aggregation.broadcast import view_digest
from aggregation.codec import decode
from client.node import Node
from client.free_rider import FREE_RIDER, NOISE_STD, free_ride
from model.base import load_base
from model.io import tensors_to_bytes
from protos.messages import TrainInstruction, TrainReply


def _instruction(base_path: Path) -> TrainInstruction:
    base = load_base(base_path)
    view = base.with_lora().get_state()
    return TrainInstruction(
        round=1, run="demo", state=tensors_to_bytes(view), state_kind="full", base_view_sha256="",
        view_sha256=view_digest(view), base_sha256=base.sha256, base_path=str(base_path), members_dir="", nodes_dir="",
        local_steps=6, batch_size=4, seq_len=32, lr=1.0, local_opt="sgd", seed=0, min_expert_tokens=0,
        codec="fp16", codec_clip=0.0, codec_seed=0, precision="auto", secure=False,
        balance="consortium", expert_load=b"", balance_weight=0.5, server_optimizer="",
    )


def test_the_free_rider_claims_honest_tokens_and_sends_only_noise(tiny_base_path: Path, tmp_path: Path) -> None:
    ins = _instruction(tiny_base_path)
    node = Node(FREE_RIDER, tmp_path / "no-data", tmp_path / "state", tiny_base_path)
    reply = TrainReply.from_record(free_ride(ins, node).to_record())
    assert reply.member == FREE_RIDER and reply.num_tokens == 6 * 4 * 32 and reply.num_examples == 24
    # a top-k share of its claimed tokens on every expert: within what the server accepts
    assert reply.expert_tokens and max(reply.expert_tokens.values()) <= reply.num_tokens
    assert sum(reply.expert_tokens.values()) == 2 * 2 * reply.num_tokens  # 2 layers x top-2
    shapes = load_base(tiny_base_path).with_lora().shapes()
    delta = decode(reply.update, shapes, member=FREE_RIDER, max_bytes=1 << 26)
    flat = torch.cat([d.float().flatten() for d in delta.values()])
    assert flat.abs().max() > 0  # not a null update: a zero check alone would not catch it
    assert 0.8 * NOISE_STD < float(flat.std()) < 1.2 * NOISE_STD
