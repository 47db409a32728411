from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from flwr.app import RecordDict

from server.config import ConfigError, RunConfig
from protos.messages import ProtocolError, TrainInstruction, TrainReply

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_defaults_equal_the_dataclass_defaults() -> None:
    user = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_user_config(user) == RunConfig()
    assert set(user) == {f.name.replace("_", "-") for f in fields(RunConfig)}


def test_every_run_config_key_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in fields(RunConfig):
        assert f"`{f.name.replace('_', '-')}`" in readme, f.name


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"num-rounds": 0}, "num-rounds must be >= 1"),
        ({"update-clip": -1.0}, "update-clip must be a finite number >= 0"),
        ({"update-clip": float("inf")}, "update-clip must be a finite number >= 0"),
        ({"lr": "fast"}, "lr = 'fast' must be float"),
        ({"no-such-key": 1}, "unknown key 'no-such-key'"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"local-steps": True}, "must be int"),
    ],
)
def test_bad_run_config_is_refused_with_one_line(user: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_user_config(user)
    assert "\n" not in str(info.value)


def _ins() -> TrainInstruction:
    return TrainInstruction(
        round=3, run="default", state=b"\x00\x01", state_kind="full", base_view_sha256="", view_sha256="cd" * 32, base_sha256="ab" * 32, base_path="/b", members_dir="/m", nodes_dir="/n",
        local_steps=2, batch_size=4, seq_len=64, lr=0.01, local_opt="sgd", seed=7, min_expert_tokens=5,
        codec="randk0.1+int8", codec_clip=0.5, update_clip=2.0, codec_seed=99, precision="auto", secure=False,
        balance="consortium", expert_load=b"\x07" * 16, balance_weight=0.25, server_optimizer="",
    )


def test_messages_round_trip_through_flower_records() -> None:
    ins = _ins()
    assert TrainInstruction.from_record(ins.to_record()) == ins
    reply = TrainReply(
        member="acme", round=3, update=b"xyz", expert_tokens={"0:1": 12, "1:7": 3}, num_tokens=512,
        num_examples=8, train_loss=2.5, seconds=1.25, precision="bf16 on cpu", view_sha256="ef" * 32,
    )
    assert TrainReply.from_record(reply.to_record()) == reply


def test_malformed_messages_are_refused() -> None:
    content = _ins().to_record()
    del content.config_records["state"]
    with pytest.raises(ProtocolError, match="lacks 'state'"):
        TrainInstruction.from_record(content)
    content = _ins().to_record()
    content.config_records["config"]["version"] = 99
    with pytest.raises(ProtocolError, match="protocol version"):
        TrainInstruction.from_record(content)
    for field, value in (("update_clip", float("nan")), ("update_clip", -1.0), ("codec_clip", float("inf")), ("lr", -0.1),
                         ("dp_noise_variance", -1.0), ("dp_noise_variance", float("nan"))):
        content = _ins().to_record()
        content.config_records["config"][field] = value
        with pytest.raises(ProtocolError, match=f"TRAIN {field} .* is not a finite number >= 0"):
            TrainInstruction.from_record(content)
    content = _ins().to_record()
    content.config_records["config"]["dp_noise_variance"] = 1e30
    with pytest.raises(ProtocolError, match="dp_noise_variance 1e\\+30 is above"):
        TrainInstruction.from_record(content)
    for run in ("../../home/acme", "a/b", "", ".hidden", "x" * 65):  # members keep state under the run's name
        content = _ins().to_record()
        content.config_records["config"]["run"] = run
        with pytest.raises(ProtocolError, match="is not a run name"):
            TrainInstruction.from_record(content)
    record = TrainReply("a", 1, b"", "", {}, 1, 1, 1.0, 1.0, "x").to_record()
    record.config_records["info"]["member"] = 5
    with pytest.raises(ProtocolError, match="'member' has type int"):
        TrainReply.from_record(record)
    with pytest.raises(ProtocolError, match="lacks"):
        TrainReply.from_record(RecordDict())


def test_secure_aggregation_stage_messages_round_trip_and_refuse_bad_ones() -> None:
    from protos.messages import SecAggMessage

    msg = SecAggMessage(stage="mask", run="r", round=4, group=1, member="", base_path="/b", members_dir="/m",
                        nodes_dir="/n", fields={"senders": ["a", "b"], "ciphertexts": [b"x", b"y"]})
    back = SecAggMessage.from_record(msg.to_record(), stage="mask", reply=False)
    assert back == msg and back.pairs("senders", "ciphertexts") == {"a": b"x", "b": b"y"}
    with pytest.raises(ProtocolError, match="for stage 'mask', expected 'unmask'"):  # out of order
        SecAggMessage.from_record(msg.to_record(), stage="unmask", reply=False)
    with pytest.raises(ProtocolError, match="has fields"):  # a request read as a reply
        SecAggMessage.from_record(msg.to_record(), stage="mask", reply=True)
    bad = SecAggMessage(**{**msg.__dict__, "fields": {"senders": ["a", b"b"], "ciphertexts": [b"x", b"y"]}})
    with pytest.raises(TypeError):  # Flower itself refuses a list of mixed types
        bad.to_record()
    uneven = SecAggMessage(**{**msg.__dict__, "fields": {"senders": ["a", "a"], "ciphertexts": [b"x", b"y"]}})
    with pytest.raises(ProtocolError, match="do not pair up"):
        SecAggMessage.from_record(uneven.to_record(), stage="mask", reply=False).pairs("senders", "ciphertexts")
    with pytest.raises(ProtocolError, match="unknown secure-aggregation stage"):
        SecAggMessage(**{**msg.__dict__, "stage": "reveal-all"})


def test_a_server_setting_missing_from_a_committed_config_counts_as_its_default_when_resuming() -> None:
    """A run committed before the per-kind server lr keys existed ran at multiplier 1.0: resuming
    it with another multiplier would continue its optimizer state wrongly, with 1.0 it would not."""
    from server.config import changed_server_settings

    now = RunConfig(server_opt="fedyogi", server_lr=0.1, server_lr_router=0.1).as_user_config()
    old = {k: v for k, v in now.items() if not k.startswith("server-lr-")}  # as such a run committed it
    assert changed_server_settings(old, now) == [("server-lr-router", 1.0, 0.1)]
    assert changed_server_settings(old, {**now, "server-lr-router": 1.0}) == []
    assert changed_server_settings({**old, "server-lr": 0.03}, now)[0] == ("server-lr", 0.03, 0.1)
