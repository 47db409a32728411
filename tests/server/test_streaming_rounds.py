"""Streaming secure aggregation in the round loop: each masked vector is folded into its group's
sum as it arrives and dropped, so the operator holds O(groups) of them, not O(members), and what it
commits is, bit for bit, the sum of the survivors' inputs (a dropout and a bad reply included).

On main the masked vectors of the round were held all at once: with 30 members in 3 groups the
test's counts peaked at 30 pulled mask replies, 20 parsed MaskedInputs and 30 unpacked vectors in
the sessions (here: 9, 1 and 4).
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.app as client_app
import privacy.secagg_server
import server.secure
from protos.messages import SECAGG_STAGES, SecAggMessage
from server.grid import PULL_BATCH
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, simulated_member, task_identity
from test_secure_rounds import MASK, UNMASK, Inputs, assert_applied, config, expected_delta


def test_a_secure_round_commits_the_exact_sum_with_a_dropout_and_a_bad_masked_input(ws: Workspace) -> None:
    silent, bad = 1001, 1003  # silent drops out before masking; bad sends a masked vector a byte short

    def truncating(message: Message, context: Context) -> Message:
        reply = client_app.app(message, context)
        if message.metadata.message_type == MASK and context.node_id == bad and not reply.has_error():
            parsed = SecAggMessage.from_record(reply.content, stage="mask", reply=True)
            short = {**parsed.fields, "packed": parsed.fields["packed"][:-1]}  # type: ignore[index]
            reply = Message(replace(parsed, fields=short).to_record(), reply_to=message)
        return reply

    members = ws.members()
    inputs = Inputs(ws, "stream")
    grid = FakeGrid(truncating, 5, before=inputs,
                    drop=lambda node, kind: node == silent and kind in (MASK, UNMASK))
    cfg = config(ws.root, secagg_threshold=3)
    with task_identity():
        [summary] = run_rounds(grid, cfg, LogReporter(), run_name="stream")
    survivors = {m for i, m in enumerate(members) if 1000 + i not in (silent, bad)}
    assert {r.member for r in summary.members} == survivors
    assert "mask: no reply" in summary.rejected[members[silent - 1000]]
    assert "masked input is" in summary.rejected[members[bad - 1000]]
    held = inputs.by_round[1]
    # exactly the committed state computed from the survivors' own inputs, summed apart
    assert_applied(ws, "stream", 1, expected_delta(ws, cfg, 1, [{m: held[m] for m in survivors}]))


class Alive:
    """How many tracked objects are alive at once: counted as they are made and freed."""

    def __init__(self) -> None:
        self.now = self.peak = self.made = 0

    def track(self, obj: object) -> object:
        self.now += 1
        self.made += 1
        self.peak = max(self.peak, self.now)
        weakref.finalize(obj, self._freed)
        return obj

    def _freed(self) -> None:
        self.now -= 1


def simulated_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_app.serve_train(msg, context, simulated_member)

    app.train("hello")(client_app.hello)
    for stage in SECAGG_STAGES:
        app.train(f"secagg_{stage}")(client_app.secagg_handler(stage))
    return app


def test_the_operator_holds_a_masked_vector_per_group_not_per_member(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    members = 30
    for i in range(members - len(ws.members())):  # simulated members need no data: they do not train
        (ws.members_dir / f"sim{i:02d}").mkdir()
    replies, masked, vectors = Alive(), Alive(), Alive()

    class Counting(FakeGrid):
        def pull_messages(self, message_ids):  # noqa: ANN001, ANN202 - the mask stage's replies, once pulled
            return [replies.track(r) if r.metadata.message_type == MASK else r for r in super().pull_messages(message_ids)]

    made, unpack = server.secure.MaskedInput, privacy.secagg_server.unpack_u64
    monkeypatch.setattr(server.secure, "MaskedInput", lambda *a: masked.track(made(*a)))
    monkeypatch.setattr(privacy.secagg_server, "unpack_u64", lambda *a: vectors.track(unpack(*a)))
    # three disjoint groups of ten (server/sampling.py plan_groups), each securely summed apart
    cfg = config(ws.root, contribution="secure", contribution_min_group=10, min_members=20, secagg_timeout=5.0)
    with task_identity():
        [summary] = run_rounds(Counting(simulated_app(), members), cfg, LogReporter(), run_name="thirty")
    groups = summary.contribution["groups"]
    assert len(summary.members) == members and len(groups) == 3  # type: ignore[arg-type]
    assert replies.made == masked.made == vectors.made == members
    assert masked.peak <= 1  # each parsed, folded and dropped before the next
    assert vectors.peak <= len(groups) + 1  # type: ignore[arg-type]  # a running sum per group, and the one being added
    assert replies.peak <= PULL_BATCH + 1  # one pull's worth, and the last one of the pull before
    assert replies.now == masked.now == vectors.now == 0  # nothing of a member's is left after the round


def test_replies_are_pulled_a_few_at_a_time_and_handed_over_in_the_order_sent() -> None:
    from types import SimpleNamespace

    from server.grid import arriving

    class Grid:
        def __init__(self) -> None:
            self.asked: list[list[str]] = []

        def push_messages(self, messages: list[object]) -> list[str]:
            return [f"m{i}" for i in range(len(messages))]

        def pull_messages(self, ids: list[str]) -> list[SimpleNamespace]:
            self.asked.append(list(ids))
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if i != "m3"]

    grid = Grid()
    got = [r.metadata.reply_to_message_id for r in arriving(grid, [object()] * 20, 0.05, poll=0.01)]  # type: ignore[arg-type]
    assert got == [f"m{i}" for i in range(20) if i != 3]  # m3 never answers: waited for until the deadline
    assert max(map(len, grid.asked)) == PULL_BATCH and ["m3"] in grid.asked
