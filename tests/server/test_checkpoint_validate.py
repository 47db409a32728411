from __future__ import annotations

import struct

import pytest
import torch

from server.config import RunConfig
from protos.messages import TrainReply
from aggregation.codec import UpdateRejected, encode
from aggregation.codec_config import CodecConfig
from server.checkpoint import CheckpointError, Checkpoints
from server.validate import validate_update

SHAPES = {"a.lora_B": (4, 2), "layers.0.mlp.experts.down_proj.lora_B.e1": (3, 2)}
CONFIG = RunConfig(local_steps=2, batch_size=2, seq_len=16, codec="fp32")  # token budget 64


EXPERT = "layers.0.mlp.experts.down_proj.lora_B.e1"  # expert '0:1'


def reply(delta: dict[str, torch.Tensor], num_tokens: int = 64, experts: dict[str, int] | None = None,
          loss: float = 1.0, seconds: float = 1.0) -> TrainReply:
    return TrainReply("acme", 1, encode(delta, CodecConfig("fp32"), seed=0), "", experts or {}, num_tokens, 4, loss, seconds, "bf16")


def test_commit_and_load_round_trip_and_pointer_moves_last(tmp_path) -> None:
    ckpt = Checkpoints(tmp_path / "run")
    assert ckpt.load() is None
    s1 = {"x": torch.randn(3, 2)}
    ckpt.commit(0, {"x": torch.zeros(3, 2)}, {"val_loss": {"d": 2.0}})
    ckpt.commit(1, s1, {"val_loss": {"d": 1.5}})
    loaded = ckpt.load()
    assert loaded is not None and loaded.round == 1 and torch.equal(loaded.state["x"], s1["x"])
    assert [m["round"] for m in ckpt.manifests()] == [0, 1]
    # a half-written round 2 (crash before the pointer moved) is not committed
    (ckpt.round_dir(2)).mkdir()
    (ckpt.round_dir(2) / "state.safetensors").write_bytes(b"partial")
    assert ckpt.load().round == 1


def test_tampered_committed_state_is_detected(tmp_path) -> None:
    ckpt = Checkpoints(tmp_path / "run")
    ckpt.commit(0, {"x": torch.ones(8)}, {})
    path = ckpt.round_dir(0) / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        ckpt.load()


def test_valid_update_passes() -> None:
    delta = {"a.lora_B": torch.ones(4, 2), EXPERT: torch.ones(3, 2)}
    update = validate_update(reply(delta, experts={"0:1": 64}), SHAPES, CONFIG)
    assert update.member == "acme" and update.num_tokens == 64 and update.expert_tokens == {"0:1": 64}


@pytest.mark.parametrize(
    ("experts", "sent", "loss", "seconds", "message"),
    [
        # an inflated claim: a token reaches an expert at most once per layer (the old bound was 8x the budget)
        ({"0:1": 65}, True, 1.0, 1.0, r"expert-tokens\[0:1\] = 65 outside \[0, num-tokens 64\]"),
        ({"0:1": 10}, False, 1.0, 1.0, r"expert-tokens\[0:1\] counts tokens for an expert it sent no update for"),
        ({"junk": 1}, True, 1.0, 1.0, "expert-tokens names 'junk', not an expert"),
        ({"0:1:2": 1}, True, 1.0, 1.0, "expert-tokens names '0:1:2', not an expert"),
        ({}, True, 1.0, float("inf"), "seconds inf is not a finite number >= 0"),
        ({}, True, 1.0, -2.0, "seconds -2.0 is not a finite number >= 0"),
        ({}, True, float("nan"), 1.0, "train-loss nan is not a finite number >= 0"),
    ],
)
def test_self_reported_numbers_are_checked_where_they_arrive(experts, sent, loss, seconds, message) -> None:
    delta = {"a.lora_B": torch.ones(4, 2), **({EXPERT: torch.ones(3, 2)} if sent else {})}
    with pytest.raises(UpdateRejected, match=message):
        validate_update(reply(delta, experts=experts, loss=loss, seconds=seconds), SHAPES, CONFIG)


@pytest.mark.parametrize(
    ("delta", "tokens", "experts", "message"),
    [
        ({"a.lora_B": torch.ones(4, 3)}, 64, {}, r"member 'acme': tensor 'a.lora_B': has shape \[4, 3\], expected \(4, 2\)"),
        ({"b.lora_B": torch.ones(4, 2)}, 64, {}, "member 'acme': tensor 'b.lora_B': not in the trainable state"),
        ({"a.lora_B": torch.ones(4, 2)}, 10**6, {}, "num-tokens 1000000 outside"),
        ({"a.lora_B": torch.ones(4, 2)}, 64, {"0:1": 10**9}, r"expert-tokens\[0:1\]"),
    ],
)
def test_bad_updates_are_rejected_naming_member_and_field(delta, tokens, experts, message) -> None:
    with pytest.raises(UpdateRejected, match=message):
        validate_update(reply(delta, tokens, experts), SHAPES, CONFIG)


def test_garbage_and_non_finite_payloads_are_refused_naming_member() -> None:
    bad = TrainReply("acme", 1, b"\xff" * 40, "", {}, 64, 4, 1.0, 1.0, "bf16")
    with pytest.raises(UpdateRejected, match="member 'acme': bad magic"):
        validate_update(bad, SHAPES, CONFIG)
    payload = bytearray(encode({"a.lora_B": torch.ones(4, 2)}, CodecConfig("fp32"), seed=0))
    payload[-4:] = struct.pack("<f", float("nan"))  # the last value of the raw fp32 section
    nan = TrainReply("acme", 1, bytes(payload), "", {}, 64, 4, 1.0, 1.0, "bf16")
    with pytest.raises(UpdateRejected, match="member 'acme'.*a.lora_B"):
        validate_update(nan, SHAPES, CONFIG)


def test_an_update_in_another_codec_than_the_rounds_is_refused() -> None:
    other = TrainReply("acme", 1, encode({"a.lora_B": torch.ones(4, 2)}, CodecConfig("int8"), seed=0), "", {}, 64, 4, 1.0, 1.0, "x")
    with pytest.raises(UpdateRejected, match="member 'acme'"):
        validate_update(other, SHAPES, CONFIG)
