"""The demo's free rider passes the server's reply checks (it tries to look honest) and sends noise."""

from __future__ import annotations

from pathlib import Path

import pytest
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
        codec="fp16", codec_clip=0.0, update_clip=0.0, codec_seed=0, precision="auto", secure=False,
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


def test_an_honest_member_clips_its_update_to_the_runs_update_clip(tiny_base_path: Path, tmp_path: Path) -> None:
    """Run config `update-clip`: the member scales its update down to that L2 norm before it encodes
    it (the bound the operator cannot apply under secure aggregation); a shorter update is untouched."""
    import dataclasses

    from client.node import reply_for
    from client.trainer import TrainResult

    ins = dataclasses.replace(_instruction(tiny_base_path), codec="fp32")
    lora = load_base(tiny_base_path).with_lora()
    g = torch.Generator().manual_seed(3)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in lora.get_state().items()}
    norm = float(torch.cat([d.flatten() for d in delta.values()]).norm())
    result = TrainResult(delta=delta, expert_tokens={"0:0": 10}, num_tokens=100, num_examples=4, train_loss=3.0,
                         seconds=0.1, experts_sent=1, experts_skipped=0)
    shapes = lora.shapes()

    def sent(clip: float, member: str) -> torch.Tensor:
        node = Node(member, tmp_path / "no-data", tmp_path / member, tiny_base_path)
        reply = reply_for(result, dataclasses.replace(ins, update_clip=clip), node, lora, "fp32")
        decoded = decode(reply.update, shapes, member=member, max_bytes=1 << 26)
        return torch.cat([decoded[k].float().flatten() for k in sorted(delta)])

    original = torch.cat([delta[k].flatten() for k in sorted(delta)])
    clipped = sent(0.25 * norm, "acme")
    assert float(clipped.norm()) == pytest.approx(0.25 * norm, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(clipped, original, dim=0)) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(sent(2.0 * norm, "globex"), original)  # under the bound: sent as it is
    assert torch.equal(sent(0.0, "initech"), original)  # 0: off
