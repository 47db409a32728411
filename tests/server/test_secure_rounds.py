"""Secure aggregation in the round loop: the real ClientApp and run_rounds over an in-process Grid.

What the operator commits must be exactly the decoded sum of the survivors' ring inputs (read
from the members' disks just before they mask them), dropouts at each stage must leave the
survivors' exact sum, too few survivors must abort with nothing committed, and the members must
refuse stage messages they should not answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregation.codec_config import CodecConfig
from aggregation.secure import TOKENS, SecureLayout
from client.app import app
from client.secure import handle_stage, identity_key, keep_input, load_roster, round_dir, simulated_roster
from privacy.certs import _load_key, issue
from privacy.roster import sign_roster
from server.config import ConfigError, RunConfig
from protos.messages import HELLO, SecAggMessage, secagg_message_type
from server.workspace import Workspace
from model.base import load_base
from model.io import load_tensors
from model.lora import expert_of
from privacy.secagg import ProtocolViolation
from server.checkpoint import Checkpoints
from server.ledger import Ledger, OperatorKey
from server.rounds import RoundAborted, run_rounds
from server.summary import LogReporter
from server.scoring import combine_group_sums

from fake_grid import FakeGrid, task_identity

MASK, UNMASK, SHARE = (secagg_message_type(s) for s in ("mask", "unmask", "share"))


def config(ws: Path, **overrides: object) -> RunConfig:
    base = RunConfig(
        workspace=str(ws), num_rounds=1, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
        min_expert_tokens=8, min_members=2, round_timeout=5.0, codec="randk0.2+int8", codec_clip=0.05,
        secagg="on", secagg_timeout=0.3, contribution="off", contribution_batches=1,
        round_retries=0,  # an abort ends the run here; tests/server/test_retry_rounds.py retries
    )
    return base.with_overrides(**overrides)


class Inputs:
    """Snapshots each member's ring input as it is about to be masked."""

    def __init__(self, ws: Workspace, run: str) -> None:
        self.members = ws.members()
        self.ws, self.run = ws, run
        self.by_round: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, node: int, message) -> None:  # noqa: ANN001
        if message.metadata.message_type != MASK:
            return
        member = self.members[node - 1000]
        rnd = int(message.metadata.group_id)
        folder = round_dir(self.ws.node_dir(member), self.run, rnd)
        self.by_round.setdefault(rnd, {})[member] = load_tensors(folder / "input.safetensors")["x"]


def expected_delta(ws: Workspace, cfg: RunConfig, rnd: int, groups: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    lora = load_base(ws.base).with_lora()
    shapes = lora.shapes()
    layout = SecureLayout(shapes, {n: expert_of(n) or TOKENS for n in shapes}, cfg.codec_config(),
                          cfg.seed * 1_000_003 + rnd, cfg.local_steps * cfg.batch_size * cfg.seq_len)
    sums = [layout.decode_sum(sum(g.values()), len(g)) for g in groups]
    return combine_group_sums(sums)


def committed_delta(ws: Workspace, run: str, rnd: int) -> dict[str, torch.Tensor]:
    checkpoints = Checkpoints(ws.run_dir(run))
    before, after = checkpoints.load(rnd - 1).state, checkpoints.load(rnd).state
    return {k: after[k] - before[k] for k in after}


def assert_applied(ws: Workspace, run: str, rnd: int, expected: dict[str, torch.Tensor]) -> None:
    checkpoints = Checkpoints(ws.run_dir(run))
    before, after = checkpoints.load(rnd - 1).state, checkpoints.load(rnd).state
    for name, value in after.items():
        want = before[name] + expected[name] if name in expected else before[name]
        assert torch.equal(value, want), name
    assert any(expected[n].abs().sum() > 0 for n in expected)


def test_dropouts_after_masking_and_at_unmask_leave_the_exact_sum_of_the_survivors(ws: Workspace) -> None:
    members = ws.members()
    gone, silent = 1001, 1003  # gone drops after sharing keys; silent masks, then never unmasks
    inputs = Inputs(ws, "drop")
    grid = FakeGrid(app, 5, before=inputs,
                    drop=lambda node, kind: (node == gone and kind in (MASK, UNMASK)) or (node == silent and kind == UNMASK))
    cfg = config(ws.root, secagg_threshold=3)
    with task_identity():
        [summary] = run_rounds(grid, cfg, LogReporter(), run_name="drop")
    survivors = {m for i, m in enumerate(members) if 1000 + i != gone}
    assert {r.member for r in summary.members} == survivors
    assert members[gone - 1000] in summary.rejected and "mask" in summary.rejected[members[gone - 1000]]
    assert all(r.secagg_seconds > 0 for r in summary.members)
    held = inputs.by_round[1]
    assert set(held) == survivors  # the dropped member never got to mask
    assert_applied(ws, "drop", 1, expected_delta(ws, cfg, 1, [{m: held[m] for m in survivors}]))
    # every member cleaned its round's secrets up, except the one that stopped answering
    leftover = {m for m in members if round_dir(ws.node_dir(m), "drop", 1).exists()}
    assert leftover <= {members[gone - 1000], members[silent - 1000]}


def test_too_few_survivors_abort_cleanly_and_the_round_reruns(ws: Workspace) -> None:
    # three of five stop after advertising: 2 members shared keys, threshold is 4 (auto)
    grid = FakeGrid(app, 5, drop=lambda node, kind: node in (1000, 1002, 1004) and kind == SHARE)
    cfg = config(ws.root)
    key = OperatorKey.load_or_create(ws.operator_key)
    with task_identity(), pytest.raises(RoundAborted, match="round 1 aborted: 0 valid"):
        run_rounds(grid, cfg, LogReporter(), run_name="abort")
    assert Checkpoints(ws.run_dir("abort")).latest_round() == 0
    assert Ledger(ws.ledger("abort"), key).latest_round() is None
    inputs = Inputs(ws, "abort")
    with task_identity():
        run_rounds(FakeGrid(app, 5, before=inputs), cfg, LogReporter(), run_name="abort")
    assert Checkpoints(ws.run_dir("abort")).latest_round() == 1
    assert_applied(ws, "abort", 1, expected_delta(ws, cfg, 1, [inputs.by_round[1]]))
    assert Ledger(ws.ledger("abort"), key).latest_round() == 1


def test_secure_contribution_groups_are_summed_apart_and_valued(ws: Workspace) -> None:
    inputs = Inputs(ws, "groups")
    cfg = config(ws.root, num_rounds=2, contribution="secure", contribution_min_group=2)
    with task_identity():
        summaries = run_rounds(FakeGrid(app, 5, before=inputs), cfg, LogReporter(), run_name="groups")
    manifests = Checkpoints(ws.run_dir("groups")).manifests()
    for rnd in (1, 2):
        how = manifests[rnd]["contribution"]
        assert how["mode"] == "secure"
        groups = [frozenset(g["members"]) for g in how["groups"]]
        assert len(groups) == 2 and sum(map(len, groups)) == 5 and not groups[0] & groups[1]
        assert all(len(g) >= 2 for g in groups)
        held = inputs.by_round[rnd]
        assert_applied(ws, "groups", rnd, expected_delta(ws, cfg, rnd, [{m: held[m] for m in g} for g in groups]))
    # scored after the round's evaluation: all groups' value is its head, and under fedavg the
    # zero round is the model the last round committed (evaluated then): base, each group; each group
    assert [manifests[rnd]["contribution"]["evaluations"] for rnd in (1, 2)] == [3, 2]
    shares = summaries[-1].shares
    assert set(shares) == set(ws.members())
    assert all(v >= 0 for v in shares.values()) and (abs(sum(shares.values()) - 1) < 1e-9 or not any(shares.values()))


def test_secure_aggregation_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="codec must be int8/int4 with a shared codec-clip"):
        RunConfig(secagg="on").validated()
    with pytest.raises(ConfigError, match="topk"):
        RunConfig(secagg="on", codec="topk0.1+int8", codec_clip=0.1).validated()
    with pytest.raises(ConfigError, match="contribution 'open' needs individual updates"):
        RunConfig(secagg="on", codec="int8", codec_clip=0.1, contribution="open").validated()
    with pytest.raises(ConfigError, match="set secagg = 'on'"):
        RunConfig(contribution="secure").validated()
    assert RunConfig(secagg="on", codec="int8", codec_clip=0.1).validated().contribution_mode == "secure"
    assert RunConfig().contribution_mode == "open"
    for bad in (dict(dp_member_epsilon=8.0), dict(dp_member_epsilon=8.0, secagg="on", codec="int8", codec_clip=0.1)):
        with pytest.raises(ConfigError, match="dp-member-epsilon adds noise inside secure aggregation"):
            RunConfig(**bad).validated()  # no secure aggregation, or no member-side clip
    for bad, match in ((dict(dp_member_epsilon=-1.0), "dp-member-epsilon must be"), (dict(dp_member_delta=0.0), "dp-member-delta")):
        with pytest.raises(ConfigError, match=match):
            RunConfig(**bad).validated()


def _stage(stage: str, rnd: int, **fields: object) -> SecAggMessage:
    return SecAggMessage(stage=stage, run="r", round=rnd, group=0, member="", base_path="", members_dir="",
                         nodes_dir="", fields=fields)


def _roster(tmp_path: Path, *names: str) -> dict[str, Ed25519PublicKey]:
    return {n: identity_key(tmp_path / n).public_key() for n in names}


SETUP = {"group": ["a", "b"], "threshold": 2, "neighbours": 1, "ring-bits": 12, "vector-length": 10, "graph-seed": b"s" * 16}


def test_members_refuse_stages_they_should_not_answer(tmp_path: Path) -> None:
    roster = _roster(tmp_path, "a", "b")
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ProtocolViolation, match="did not train"):  # another round
        handle_stage(_stage("advertise", 3, **SETUP), tmp_path / "a", "a", roster)
    with pytest.raises(ProtocolViolation, match="before advertise"):  # out of order
        handle_stage(_stage("mask", 2, senders=[], ciphertexts=[]), tmp_path / "a", "a", roster)
    reply = handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    assert len(reply.fields["signature"]) == 64
    with pytest.raises(ProtocolViolation, match="already advertised"):  # a replayed stage
        handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    # identities come from the roster: a server-invented member, or a roster without this node's key, is refused
    keep_input(tmp_path / "a", "r", 3, torch.zeros(10, dtype=torch.int64))
    invented = dict(SETUP, group=["a", "zz-fake"])
    with pytest.raises(ProtocolViolation, match="group member 'zz-fake' is not in the consortium's roster"):
        handle_stage(_stage("advertise", 3, **invented), tmp_path / "a", "a", roster)
    keep_input(tmp_path / "a", "r", 4, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ProtocolViolation, match="the roster does not register this node's identity key"):
        handle_stage(_stage("advertise", 4, **SETUP), tmp_path / "a", "a", {**roster, "a": roster["b"]})
    assert not any((tmp_path / "a" / "secagg" / "r").glob("round-00002"))  # keep_input cleared it


def test_roster_files_are_checked_where_they_are_read(tmp_path: Path) -> None:
    keys = {n: k.public_bytes_raw() for n, k in _roster(tmp_path, "a", "b").items()}
    layout = issue(tmp_path / "certs", []).layout
    ca = layout.ca_cert
    signed = sign_roster(_load_key(layout.ca_key), keys)
    (tmp_path / "roster.json").write_bytes(signed)
    assert {n: k.public_bytes_raw() for n, k in load_roster(tmp_path / "roster.json", ca).items()} == keys
    with pytest.raises(ProtocolViolation, match="no roster at .*fedmoe certs"):
        load_roster(tmp_path / "missing.json", ca)
    (tmp_path / "bad.json").write_text('{"members": {"a": "00ff"}}')
    with pytest.raises(ProtocolViolation, match="bad.json: the key of 'a' is 2 bytes, expected 32"):
        load_roster(tmp_path / "bad.json", ca)
    (tmp_path / "bad.json").write_text('{"members": {"../x": "' + "00" * 32 + '"}}')
    with pytest.raises(ProtocolViolation, match="is not a member name"):
        load_roster(tmp_path / "bad.json", ca)
    (tmp_path / "bad.json").write_text('{"members": {"a": "' + keys["a"].hex() + '"}}')  # unsigned
    with pytest.raises(ProtocolViolation, match="bad.json: the roster's signature does not verify"):
        load_roster(tmp_path / "bad.json", ca)


def test_a_simulated_roster_holds_the_workspace_members_only_and_keeps_their_keys(tmp_path: Path) -> None:
    first = simulated_roster(tmp_path, ["a", "b"])
    again = simulated_roster(tmp_path, ["b", "a"])
    assert sorted(first) == ["a", "b"]
    assert {n: k.public_bytes_raw() for n, k in first.items()} == {n: k.public_bytes_raw() for n, k in again.items()}
    assert first["a"].public_bytes_raw() == identity_key(tmp_path / "a").public_key().public_bytes_raw()


def test_ring_width_is_configurable_and_too_narrow_a_ring_aborts(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    with task_identity(), pytest.raises(RoundAborted):  # 5 int8 members need 11 bits
        run_rounds(FakeGrid(app, 5), config(ws.root, secagg_ring_bits=10), LogReporter(), run_name="narrow")
    assert "secagg-ring-bits 10 is too narrow: the sum of 5 members needs 11" in caplog.text
    assert Checkpoints(ws.run_dir("narrow")).latest_round() == 0
    inputs = Inputs(ws, "wide")
    cfg = config(ws.root, secagg_ring_bits=20)
    with task_identity():
        [summary] = run_rounds(FakeGrid(app, 5, before=inputs), cfg, LogReporter(), run_name="wide")
    assert_applied(ws, "wide", 1, expected_delta(ws, cfg, 1, [inputs.by_round[1]]))
    # 20 bits per element instead of 11: the uploads grow accordingly
    assert min(r.bytes_up for r in summary.members) > 1.5 * len(inputs.by_round[1]["code"]) * 11 / 8


def test_members_refuse_a_second_group_and_run_names_that_leave_the_state_dir(tmp_path: Path) -> None:
    roster = _roster(tmp_path, "a", "b")
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))
    handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    second = SecAggMessage(**{**_stage("advertise", 2, **SETUP).__dict__, "group": 1})
    with pytest.raises(ProtocolViolation, match="already advertised"):  # same input, another group
        handle_stage(second, tmp_path / "a", "a", roster)
    later = SecAggMessage(**{**_stage("share", 2, senders=[], **{"c-pubs": [], "s-pubs": [], "b-commitments": [], "signatures": []}).__dict__, "run": "other"})
    with pytest.raises(ProtocolViolation, match="did not train"):  # a stage of another run
        handle_stage(later, tmp_path / "a", "a", roster)
    escape = SecAggMessage(**{**_stage("advertise", 2, **SETUP).__dict__, "run": "../.."})
    with pytest.raises(ProtocolViolation, match="cannot name a folder"):
        handle_stage(escape, tmp_path / "a", "a", roster)
    assert (tmp_path / "a" / "secagg" / "r").is_dir()


def test_a_round_the_round_cannot_commit_is_never_unmasked(ws: Workspace) -> None:
    # two of five drop before masking: the group still has threshold 3, but min-members is 4
    grid = FakeGrid(app, 5, drop=lambda node, kind: node in (1001, 1003) and kind in (MASK, UNMASK))
    with task_identity(), pytest.raises(RoundAborted, match="round 1 aborted: 0 valid"):
        run_rounds(grid, config(ws.root, secagg_threshold=3, min_members=4), LogReporter(), run_name="few")
    assert UNMASK not in {kind for _, kind in grid.seen}  # no sum was revealed
    assert Checkpoints(ws.run_dir("few")).latest_round() == 0


def _crash_after_unmasking(ws: Workspace, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, gone: int) -> Inputs:
    """The operator unmasks the sum of four survivors of round 1, then crashes before committing."""
    commit = Checkpoints.commit

    def crash_once(self, rnd, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if rnd == 1:
            raise RuntimeError("operator crashed after unmasking round 1")
        return commit(self, rnd, *args, **kwargs)

    inputs = Inputs(ws, "rerun")
    monkeypatch.setattr(Checkpoints, "commit", crash_once)
    with task_identity(), pytest.raises(RuntimeError, match="crashed"):
        run_rounds(FakeGrid(app, 5, before=inputs, drop=lambda node, kind: node == gone and kind in (MASK, UNMASK)), cfg,
                   LogReporter(), run_name="rerun")
    monkeypatch.setattr(Checkpoints, "commit", commit)
    return inputs


def test_a_round_unmasked_before_a_crash_is_finished_from_its_journal_without_asking_anyone(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(ws.root, secagg_threshold=3)
    first = _crash_after_unmasking(ws, cfg, monkeypatch, gone=1002)
    # on main the round could then only finish with these same four survivors; now the operator
    # finishes it from the journal even if a member never comes back, and asks no member anything
    grid = FakeGrid(app, 5, drop=lambda node, kind: node == 1000)
    with task_identity():
        [summary] = run_rounds(grid, cfg, LogReporter(), run_name="rerun")
    assert "finished from its journal" in caplog.text
    assert grid.seen == []  # no TRAIN, no secure-aggregation stage
    assert len(summary.members) == 4 and "mask" in summary.rejected[ws.members()[2]]
    assert_applied(ws, "rerun", 1, expected_delta(ws, cfg, 1, [first.by_round[1]]))
    assert not any((ws.run_dir("rerun") / "journal").iterdir())  # gone with the commit


def test_without_its_journal_a_rerun_round_is_unmasked_only_for_the_survivors_of_its_first_unmask(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(ws.root, secagg_threshold=3)
    gone = 1002
    _crash_after_unmasking(ws, cfg, monkeypatch, gone)
    for path in (ws.run_dir("rerun") / "journal").iterdir():  # lost (the members' own check is what is left)
        path.unlink()
    # re-run with all five: the sum of five minus the first sum would be the fifth's update
    grid = FakeGrid(app, 5)
    with task_identity(), pytest.raises(RoundAborted, match="round 1 aborted: 0 valid"):
        run_rounds(grid, cfg, LogReporter(), run_name="rerun")
    assert "was already unmasked for survivors" in caplog.text
    assert Checkpoints(ws.run_dir("rerun")).latest_round() == 0
    # the same four survivors again: nothing new is revealed, and the round commits
    inputs = Inputs(ws, "rerun")
    with task_identity():
        [summary] = run_rounds(FakeGrid(app, 5, before=inputs, drop=lambda node, kind: node == gone and kind in (MASK, UNMASK)),
                               cfg, LogReporter(), run_name="rerun")
    assert len(summary.members) == 4
    assert_applied(ws, "rerun", 1, expected_delta(ws, cfg, 1, [inputs.by_round[1]]))


def test_per_expert_counts_in_the_clear_are_refused_under_secure_aggregation(ws: Workspace) -> None:
    from dataclasses import replace

    from flwr.app import Message

    from protos.messages import TRAIN, TrainReply

    def leaky(message, context):  # noqa: ANN001, ANN202 - node 1000 also reports its expert counts
        reply = app(message, context)
        if message.metadata.message_type == TRAIN and context.node_id == 1000:
            parsed = TrainReply.from_record(reply.content)
            reply = Message(replace(parsed, expert_tokens={"0:1": 7}).to_record(), reply_to=message)
        return reply

    with task_identity():
        [summary] = run_rounds(FakeGrid(leaky, 5), config(ws.root, secagg_threshold=3), LogReporter(), run_name="leak")
    assert "sent per-expert token counts in the clear" in summary.rejected["node 1000"]
    assert len(summary.members) == 4
    assert all(r.experts_sent == 0 for r in summary.members)  # the counts travelled masked


def test_plan_groups_rotates_a_small_consortium_evenly_and_splits_a_large_one() -> None:
    from server.sampling import plan_groups

    members = ["acme", "beta", "corp", "delta", "echo"]
    rounds = [plan_groups(members, 3, seed=7, rnd=r) for r in range(1, 11)]
    assert all(len(groups) == 1 and len(groups[0]) == 3 for groups in rounds)
    assert len({tuple(g[0]) for g in rounds}) == 10  # all ten groups of three, once each
    assert all(sum(m in g[0] for g in rounds) == 6 for m in members)  # everybody trains 6 of 10 rounds
    assert plan_groups(list(reversed(members)), 3, seed=7, rnd=4) == rounds[3]  # a re-run round: the same group
    assert [plan_groups(members, 3, seed=8, rnd=r) for r in range(1, 11)] != rounds  # the seed reorders the rotation
    six = plan_groups([f"m{i}" for i in range(6)], 3, seed=7, rnd=1)
    assert sorted(len(g) for g in six) == [3, 3] and sorted(m for g in six for m in g) == [f"m{i}" for i in range(6)]
    assert plan_groups(["a", "b", "c"], 3, seed=7, rnd=1) == [["a", "b", "c"]]
    # a round that needs 4 members to commit trains groups of 4, not 3 that could never commit
    assert all(len(plan_groups(members, 3, seed=7, rnd=r, min_members=4)[0]) == 4 for r in range(1, 6))


def test_secure_contribution_groups_follow_members_not_node_ids(ws: Workspace) -> None:
    # the same consortium under other Flower node ids (a restart, a fresh simulation) trains the
    # same groups: a fresh run from the same state and seed reveals the same sums, never new ones
    cfg = config(ws.root, num_rounds=2, contribution="secure", min_members=3)
    trained = []
    for renumber, run in ((lambda n: n, "ids-a"), (lambda n: 9000 - 7 * n, "ids-b")):  # other ids, other order
        grid = FakeGrid(app, 5)
        grid.nodes = {renumber(node): p for node, p in grid.nodes.items()}
        grid.contexts = {renumber(node): ctx for node, ctx in grid.contexts.items()}
        for node, ctx in grid.contexts.items():
            ctx.node_id = node
        with task_identity():
            summaries = run_rounds(grid, cfg, LogReporter(), run_name=run)
        trained.append([sorted(r.member for r in s.members) for s in summaries])
        assert sum(kind == HELLO for _, kind in grid.seen) == 5  # asked once, then known from replies
    assert trained[0] == trained[1]
    assert all(len(groups) == 3 for groups in trained[0])


def test_a_node_that_replies_as_another_member_than_it_said_is_refused(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    from dataclasses import replace

    from flwr.app import Message

    from protos.messages import TRAIN, TrainReply

    def impostor(message, context):  # noqa: ANN001, ANN202 - node 1000 trains, then signs as someone else
        reply = app(message, context)
        if message.metadata.message_type == TRAIN and context.node_id == 1000 and not reply.has_error():
            parsed = TrainReply.from_record(reply.content)
            reply = Message(replace(parsed, member="mallory").to_record(), reply_to=message)
        return reply

    # groups of 3 out of 5: the first round node 1000 is planned in, its group is one short and aborts
    cfg = config(ws.root, num_rounds=5, contribution="secure", min_members=3)
    with task_identity(), pytest.raises(RoundAborted):
        run_rounds(FakeGrid(impostor, 5), cfg, LogReporter(), run_name="impostor")
    # its HELLO bound node 1000 to its own name: a reply under another is refused where it arrives
    assert "node 1000 spoke as 'mallory' after speaking as" in caplog.text
    manifests = Checkpoints(ws.run_dir("impostor")).manifests()
    assert all("mallory" not in {r["member"] for r in m.get("members", [])} for m in manifests)


def test_a_member_advertises_in_a_session_once_even_when_its_round_is_rerun(tmp_path: Path) -> None:
    """A re-run under the same session could let a server replay one attempt's signatures in the
    next; the member refuses the session, and a fresh one (the server's per-attempt nonce) passes."""
    roster = _roster(tmp_path, "a", "b")
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))
    handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))  # the round is re-run: folder reset
    with pytest.raises(ProtocolViolation, match="already advertised in this session of run 'r' round 2"):
        handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))
    fresh = dict(SETUP, **{"graph-seed": b"t" * 16})
    assert len(handle_stage(_stage("advertise", 2, **fresh), tmp_path / "a", "a", roster).fields["signature"]) == 64


def test_each_attempt_at_a_round_is_a_new_session() -> None:
    from server.secure import SecureSettings, make_params

    layout = SecureLayout(shapes={"w": (4,)}, groups={"w": TOKENS}, codec=CodecConfig.parse("int8", clip=0.1), codec_seed=0, budget=8)
    settings = SecureSettings(threshold=0, neighbours=0, ring_bits=0, min_group=2, timeout=1.0, seed=0)
    first, second = (make_params(1, ["a", "b", "c"], layout, settings, 0, "r", os.urandom(16)) for _ in range(2))
    assert first.session_id != second.session_id
    assert make_params(1, ["a", "b", "c"], layout, settings, 0, "r", b"n").session_id != make_params(1, ["a", "b", "c"], layout, settings, 0, "s", b"n").session_id


def test_a_refused_stage_ends_the_members_session(tmp_path: Path) -> None:
    roster = _roster(tmp_path, "a", "b")
    keep_input(tmp_path / "a", "r", 2, torch.zeros(10, dtype=torch.int64))
    handle_stage(_stage("advertise", 2, **SETUP), tmp_path / "a", "a", roster)
    bad = _stage("share", 2, senders=["zz"], **{"c-pubs": [b"x"], "s-pubs": [b"x"], "b-commitments": [b"x"], "signatures": [b"x"]})
    with pytest.raises(ProtocolViolation, match="not a neighbour"):
        handle_stage(bad, tmp_path / "a", "a", roster)
    with pytest.raises(ProtocolViolation, match="share before advertise"):  # no second try at the stage
        handle_stage(bad, tmp_path / "a", "a", roster)


def test_member_level_dp_noise_is_summed_blind_and_its_epsilon_recorded_per_round(ws: Workspace) -> None:
    from privacy.distributed_dp import epsilon
    from server.member_dp import member_dp

    cfg = config(ws.root, num_rounds=2, local_steps=4, secagg_timeout=5.0, update_clip=3.0, dp_member_epsilon=8.0)
    from server.metrics import PrometheusReporter

    inputs = Inputs(ws, "dp")
    reporter = PrometheusReporter(LogReporter())
    with task_identity():
        summaries = run_rounds(FakeGrid(app, len(ws.members()), before=inputs), cfg, reporter, run_name="dp")
    dp = member_dp(cfg, load_base(ws.base).with_lora().shapes())
    assert dp is not None and dp.variance > 0
    spent = [s.dp_member_epsilon for s in summaries]
    assert spent[0] == pytest.approx(epsilon(1, dp.sensitivity, dp.variance, 1e-5)) and spent[0] < 8.0
    assert spent[1] == pytest.approx(8.0, rel=1e-3)  # calibrated for the run's two rounds
    manifests = Checkpoints(ws.run_dir("dp")).manifests()
    assert [m["dp_member_epsilon"] for m in manifests[1:]] == spent
    assert reporter.registry.get_sample_value("fedmoe_dp_member_epsilon") == spent[1]
    # what was committed is the survivors' noiseless sum plus the noise: off from it by whole codec steps
    noiseless = expected_delta(ws, cfg, 1, [inputs.by_round[1]])
    committed = committed_delta(ws, "dp", 1)
    step = 0.05 / 127
    off = torch.cat([(committed[n] - noiseless[n]).flatten() for n in noiseless])
    assert float(off.abs().max()) > step  # the noise is there
    # (no claim that 5 members learn under it: at epsilon 8 the noise per coordinate is about the
    # clip itself, and a sum of 5 updates of d coordinates stands out only for thousands of members)
