"""A member's name is bound to its node: a member that replies under another's name, speaks for
a second member, or sends a name that is no name is refused with one line, and the round (and
every later restart of the run) goes on."""

from __future__ import annotations

import dataclasses
import json

import pytest

from client.app import app
from protos.messages import HELLO, TRAIN, Hello, TrainInstruction, TrainReply
from server.binding import REGISTRY_ENV, MemberBinding, record_registration
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.ledger import Ledger, OperatorKey, verify
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity


def config(ws: Workspace, **overrides: object) -> RunConfig:
    base = RunConfig(
        workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=30.0, codec="fp16", contribution="open",
    )
    return base.with_overrides(**overrides)


def speaking_as(names: dict[int, str], *, from_round: int = 1):
    """The members' ClientApp, except that node -> name replies (TRAIN and HELLO) under `name`."""

    def serve(message, context):  # noqa: ANN001, ANN202
        reply = app(message, context)
        name = names.get(context.node_id)
        if name is None or reply.has_error():
            return reply
        if message.metadata.message_type == TRAIN:
            parsed = TrainReply.from_record(reply.content)
            if parsed.round >= from_round:
                reply.content = dataclasses.replace(parsed, member=name).to_record()
        elif message.metadata.message_type == HELLO:
            reply.content = dataclasses.replace(Hello.from_record(reply.content), member=name).to_record()
        return reply

    return serve


def member_at(ws: Workspace, node: int) -> str:
    return ws.members()[node - 1000]  # FakeGrid: node 1000 + i is partition i


def test_a_reply_under_another_members_name_is_refused_and_the_victim_keeps_its_update(ws: Workspace) -> None:
    victim = member_at(ws, 1000)
    with task_identity():
        summaries = run_rounds(
            FakeGrid(speaking_as({1002: victim}, from_round=2), 3), config(ws, num_rounds=2), LogReporter(), run_name="spoof",
        )
    last = summaries[-1]
    assert {m.member: m.node_id for m in last.members} == {victim: 1000, member_at(ws, 1001): 1001}
    assert list(last.rejected) == ["node 1002"]
    assert f"node 1002 spoke as {victim!r}, whom node 1000 speaks for" in last.rejected["node 1002"]
    assert set(last.scores) == {victim, member_at(ws, 1001)}  # the victim was scored on its own update


def test_a_name_two_nodes_say_first_in_the_same_round_counts_for_neither(ws: Workspace) -> None:
    """Whichever reply arrives first must not decide whose the name is: neither counts."""
    victim = member_at(ws, 1000)
    with task_identity():
        [summary] = run_rounds(FakeGrid(speaking_as({1002: victim}), 4), config(ws), LogReporter(), run_name="race")
    assert {m.member for m in summary.members} == {member_at(ws, 1001), member_at(ws, 1003)}
    for node in ("node 1000", "node 1002"):
        assert f"{victim!r} is claimed by nodes [1000, 1002] this round and bound to none of them" in summary.rejected[node]


def test_a_node_cannot_speak_for_a_second_member_in_a_later_round(ws: Workspace) -> None:
    """A Sybil: after a round as itself, node 1002 replies as a member nobody speaks for yet."""
    with task_identity():
        summaries = run_rounds(
            FakeGrid(speaking_as({1002: "phantom"}, from_round=2), 3), config(ws, num_rounds=2), LogReporter(), run_name="sybil",
        )
    assert len(summaries[0].members) == 3 and not summaries[0].rejected
    assert f"node 1002 spoke as 'phantom' after speaking as {member_at(ws, 1002)!r}" in summaries[1].rejected["node 1002"]
    assert {m.member for m in summaries[1].members} == {member_at(ws, 1000), member_at(ws, 1001)}


@pytest.mark.parametrize("name", ["", "../../etc", "a" * 65, "bad name"])
def test_a_name_that_is_no_member_name_is_rejected_and_the_run_stays_resumable(ws: Workspace, name: str) -> None:
    with task_identity():
        [summary] = run_rounds(FakeGrid(speaking_as({1001: name}), 3), config(ws), LogReporter(), run_name="named")
        assert "is not a member name" in summary.rejected["node 1001"]
        assert len(summary.members) == 2
        # the committed run resumes, and its ledger verifies, with the bad reply left out of both
        [again] = run_rounds(FakeGrid(app, 3), config(ws, num_rounds=2), LogReporter(), run_name="named")
    assert again.round == 2 and len(again.members) == 3
    key = OperatorKey.load(ws.operator_key)
    report = verify(ws.ledger("named"), key.public_key)
    assert report.ok, report.problem
    with Ledger(ws.ledger("named"), key) as book:
        assert book.latest_round() == 2
        assert {r.member for r in book.records() if r.round == 1 and r.kind == "contribution"} == {member_at(ws, 1000), member_at(ws, 1002)}


def test_with_a_registry_the_name_belongs_to_its_registered_node(ws: Workspace, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1000 replies as node 1001's member from round 1: without a registry that name is
    contested and counts for neither; with the consortium's registry it stays node 1001's."""
    target = member_at(ws, 1001)
    registry = tmp_path / "members.json"
    for node in (1000, 1001, 1002):
        record_registration(registry, member_at(ws, node), node)
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    with task_identity():
        [bound] = run_rounds(FakeGrid(speaking_as({1000: target}), 3), config(ws), LogReporter(), run_name="bound")
    assert {m.member: m.node_id for m in bound.members} == {target: 1001, member_at(ws, 1002): 1002}
    assert f"node 1000 spoke as {target!r}, who is registered as node 1001" in bound.rejected["node 1000"]


def test_the_registry_refuses_unregistered_names_and_a_corrupt_registry_is_fatal(tmp_path) -> None:
    path = tmp_path / "members.json"
    record_registration(path, "acme", 7)
    record_registration(path, "globex", 9)
    binding = MemberBinding.from_env({REGISTRY_ENV: str(path)})
    binding.claim("acme", 7)
    with pytest.raises(Exception, match="'initech' is not registered"):
        binding.claim("initech", 8)
    path.write_text(json.dumps({"acme": "7"}))
    with pytest.raises(RuntimeError, match="must map member names to node ids"):
        MemberBinding.from_env({REGISTRY_ENV: str(path)})


def test_secure_mode_a_name_two_nodes_say_at_hello_sits_both_out_whatever_the_arrival_order(ws: Workspace) -> None:
    victim = member_at(ws, 1000)
    cfg = config(ws, secagg="on", codec="int8", codec_clip=0.05, contribution="secure", contribution_min_group=2)
    with task_identity():
        [summary] = run_rounds(FakeGrid(speaking_as({1003: victim}), 4), cfg, LogReporter(), run_name="hello")
    assert {m.node_id for m in summary.members} == {1001, 1002}
    assert Checkpoints(ws.run_dir("hello")).latest_round() == 1


def test_a_bound_node_cannot_block_a_newcomers_name(ws: Workspace) -> None:
    """Node 1002 (bound to its own name in round 1) says node 1003's name when 1003 first
    speaks in round 2: 1003 keeps its name, 1002's reply is refused."""
    from flwr.app import Error, Message

    newcomer = member_at(ws, 1003)
    spoofing = speaking_as({1002: newcomer}, from_round=2)

    def grid_app(message, context):  # noqa: ANN001, ANN202 - node 1003's first round fails (it is not set up yet)
        if context.node_id == 1003 and message.metadata.message_type == TRAIN:
            if TrainInstruction.from_record(message.content).round == 1:
                return Message(error=Error(103, "not set up yet"), reply_to=message)
        return spoofing(message, context)

    with task_identity():
        _, second = run_rounds(FakeGrid(grid_app, 4), config(ws, num_rounds=2), LogReporter(), run_name="late")
    assert {m.member: m.node_id for m in second.members}[newcomer] == 1003
    assert "node 1002 spoke as" in second.rejected["node 1002"]


def test_an_empty_or_missing_registry_refuses_everyone_rather_than_trusting_names(tmp_path) -> None:
    missing = MemberBinding.from_env({REGISTRY_ENV: str(tmp_path / "members.json")})
    with pytest.raises(Exception, match="'acme' is not registered"):
        missing.claim("acme", 7)
    assert not missing.warn and MemberBinding.from_env({}).warn
