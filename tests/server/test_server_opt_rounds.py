"""The server optimizer in the round loop: its state is committed with each round, a resumed run
continues it bit-identically, and a run cannot silently switch optimizers halfway."""

from __future__ import annotations

import json

import pytest
import torch

from client.app import app
from server.checkpoint import CheckpointError, Checkpoints
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity


def config(ws: Workspace, **overrides: object) -> RunConfig:
    base = RunConfig(
        workspace=str(ws.root), num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="fp16", contribution="off",
        server_opt="fedadam", server_lr=0.01,
    )
    return base.with_overrides(**overrides)


def test_adaptive_server_state_is_committed_and_a_resumed_run_matches_an_uninterrupted_one(ws: Workspace) -> None:
    with task_identity():
        run_rounds(FakeGrid(app, 3), config(ws), LogReporter(), run_name="straight")
        run_rounds(FakeGrid(app, 3), config(ws, num_rounds=1), LogReporter(), run_name="resumed")
        run_rounds(FakeGrid(app, 3), config(ws), LogReporter(), run_name="resumed")
        run_rounds(FakeGrid(app, 3), config(ws, server_opt="fedavg", server_lr=1.0), LogReporter(), run_name="plain")
    straight, resumed = Checkpoints(ws.run_dir("straight")).load(), Checkpoints(ws.run_dir("resumed")).load()
    assert straight.round == resumed.round == 2
    assert straight.optimizer and set(straight.optimizer) == set(resumed.optimizer)
    assert all(torch.equal(straight.optimizer[k], resumed.optimizer[k]) for k in straight.optimizer)
    assert all(torch.equal(straight.state[k], resumed.state[k]) for k in straight.state)
    assert {int(v) for k, v in straight.optimizer.items() if k.startswith("t/")} <= {1, 2}
    # the optimizer is what moved the state: the same rounds under plain fedavg end elsewhere
    plain = Checkpoints(ws.run_dir("plain")).load()
    assert plain.optimizer == {}
    assert any(not torch.equal(plain.state[k], straight.state[k]) for k in plain.state)


def test_a_run_resumed_with_another_server_optimizer_is_refused(ws: Workspace) -> None:
    with task_identity():
        run_rounds(FakeGrid(app, 3), config(ws, num_rounds=1), LogReporter(), run_name="switch")
        with pytest.raises(RuntimeError, match="committed with server-opt 'fedadam', resumed with 'fedyogi'"):
            run_rounds(FakeGrid(app, 3), config(ws, server_opt="fedyogi"), LogReporter(), run_name="switch")
        with pytest.raises(RuntimeError, match="committed with server-beta2 0.99, resumed with 0.999"):
            run_rounds(FakeGrid(app, 3), config(ws, server_beta2=0.999), LogReporter(), run_name="switch")
    checkpoints = Checkpoints(ws.run_dir("switch"))
    assert checkpoints.latest_round() == 1  # nothing lost
    path = checkpoints.round_dir(1) / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256 does not match"):
        checkpoints.load()


def test_each_round_records_where_its_wall_time_went(ws: Workspace) -> None:
    with task_identity():
        run_rounds(FakeGrid(app, 3), config(ws, num_rounds=1), LogReporter(), run_name="timed")
    manifest = Checkpoints(ws.run_dir("timed")).manifests()[1]
    timing = manifest["timing"]
    assert set(timing) == {"sample", "broadcast", "train", "validate", "secure", "score", "aggregate", "evaluate"}
    assert all(v >= 0 for v in timing.values())
    assert sum(timing.values()) <= manifest["seconds"] + 1e-6
    # in-process members train inside the TRAIN exchange: their seconds are part of its wall time
    assert 0 < manifest["members_train_seconds"] <= timing["train"] + 1e-6
    assert manifest["members_train_seconds"] == sum(m["seconds"] for m in manifest["members"])


def test_step_broadcast_members_replay_the_server_step_and_train_from_exactly_the_state(ws: Workspace) -> None:
    # members that replay FedYogi's step hold the committed state bit for bit: the run is the
    # same as one that sends everybody the full state every round, for a download of about an upload
    settings = {"server_opt": "fedyogi", "server_lr": 0.01, "num_rounds": 3, "codec": "randk0.1+int8"}
    with task_identity():
        run_rounds(FakeGrid(app, 3), config(ws, broadcast="full", **settings), LogReporter(), run_name="full")
        run_rounds(FakeGrid(app, 3), config(ws, broadcast="step", **settings), LogReporter(), run_name="step")
        run_rounds(FakeGrid(app, 3), config(ws, broadcast="step", **{**settings, "num_rounds": 1}), LogReporter(), run_name="resumed")
        run_rounds(FakeGrid(app, 3), config(ws, broadcast="step", **settings), LogReporter(), run_name="resumed")
    full, step, resumed = (Checkpoints(ws.run_dir(r)) for r in ("full", "step", "resumed"))
    for other in (step, resumed):
        assert all(torch.equal(full.load().state[k], other.load().state[k]) for k in full.load().state)
    down = {name: [m["bytes_down"] for m in c.manifests()[1:]] for name, c in (("full", full), ("step", step), ("resumed", resumed))}
    assert abs(down["step"][0] - down["full"][0]) < 1024  # round 1: the full view (no optimizer state yet)
    assert all(s * 4 < f for s, f in zip(down["step"][1:], down["full"][1:]))  # rounds 2, 3: steps
    ups = [m["bytes_up"] for m in step.manifests()[2:]]  # rounds 2, 3
    assert all(d < 3 * u for d, u in zip(down["step"][1:], ups))  # fp32 where the upload is int8: 2.5x
    assert down["resumed"][1] > 4 * down["step"][1]  # after the resume: the full view once
    assert abs(down["resumed"][2] - down["step"][2]) < 64  # then steps again (the run names differ)


GOOD_SETTINGS = {"name": "fedyogi", "lr": 0.03, "momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 0.001, "warmup": 3,
                 "lr_attention": 0.1, "lr_experts": 0.2, "lr_router": 0.1, "lr_head": 1.0}


@pytest.mark.parametrize(
    "settings",
    [
        *(json.dumps({**GOOD_SETTINGS, **bad}) for bad in ({"lr": "big"}, {"lr": True}, {"warmup": 1.5}, {"name": "sgd"},
                                                            {"beta2": 1.0}, {"extra": 1}, {"lr_router": -0.1},
                                                            {"lr_head": "1"})),
        json.dumps({k: v for k, v in GOOD_SETTINGS.items() if k != "tau"}),
        '{"lr": 1' + "0" * 400 + "}", "[" * 100_000, '["fedyogi"]', "{",
    ],
)
def test_a_step_with_server_optimizer_settings_that_are_not_one_is_refused(settings: str) -> None:
    from dataclasses import replace

    from aggregation.broadcast import encode_step, step_view
    from aggregation.server_opt import ServerOptError
    from client.node import replay_step
    from protos.messages import ProtocolError
    from test_config_protocol import _ins as instruction

    W = "model.layers.0.self_attn.q_proj.lora_B.weight"  # a name the MoE families describe
    held = step_view({W: torch.zeros(4)}, {})
    ok = replay_step(held, encode_step({W: torch.ones(4)}), replace(instruction(), server_optimizer=json.dumps(GOOD_SETTINGS)))
    assert int(ok[f"opt/t/{W}"]) == 1 and float(ok[W][0]) > 0  # the good settings step
    with pytest.raises((ProtocolError, ServerOptError), match="server"):
        replay_step(held, encode_step({W: torch.ones(4)}), replace(instruction(), server_optimizer=settings))


def test_two_runs_on_the_same_nodes_keep_their_own_views(ws: Workspace) -> None:
    # two runs take turns on the same members (a SuperLink runs several): each run's members
    # still hold its view and get a patch (one view file per node made every turn a full resend)
    from server.rounds import open_run, run_round

    reporter = LogReporter()
    with task_identity():
        grid = FakeGrid(app, 3)
        a, b = open_run(config(ws), "a"), open_run(config(ws, seed=5), "b")
        run_round(grid, a, 1, reporter)
        run_round(grid, b, 1, reporter)
        run_round(grid, a, 2, reporter)
        run_round(grid, b, 2, reporter)
    for name in ("a", "b"):
        first, second = (m["bytes_down"] for m in Checkpoints(ws.run_dir(name)).manifests()[1:])
        assert second * 2 < first  # an int8 patch (about a third of the full fp32 state)
