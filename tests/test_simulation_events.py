"""The embedded consortium's plumbing without a run: progress events survive the log stream,
and only a simulated node asked for by the run config plays the free rider."""

from __future__ import annotations

import pytest

from client.free_rider import FREE_RIDER, plays_free_rider, rider_node
from fedmoe.simulation import SimulationResult, replay
from server.config import ConfigError, RunConfig
from server.summary import EVENT, EventReporter, MemberReport, RoundSummary


class Recording:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, first_round, num_rounds, resumed) -> None:
        self.calls.append(("start", first_round, num_rounds, resumed))

    def round_started(self, rnd, num_members) -> None:
        self.calls.append(("round_started", rnd, num_members))

    def member_done(self, rnd, done, total) -> None:
        self.calls.append(("member_done", rnd, done, total))

    def round_finished(self, summary) -> None:
        self.calls.append(("round_finished", summary))

    def note(self, text) -> None:
        self.calls.append(("note", text))


def test_every_event_reaches_the_callers_reporter_unchanged(capsys) -> None:
    summary = RoundSummary(
        round=3, val_loss={"code": 4.25, "legal": 3.5},
        members=[MemberReport("code", 7, 1000, 20, 4096, 4.1, 2.5, 16, "bf16", 0.25)],
        rejected={"legal": "UpdateRejected: bad"}, seconds=9.5, scores={"code": 0.01}, shares={"code": 1.0},
        timing={"train": 2.5},
    )
    events = EventReporter()
    events.start(3, 5, True)
    events.round_started(3, 2)
    events.member_done(3, 1, 2)
    events.round_finished(summary)
    events.note("legal: broken.jsonl: line 2")
    events.finished()
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert all(line.startswith(EVENT) for line in lines) and len(lines) == 6
    recording, result = Recording(), SimulationResult()
    flower_noise = "INFO :      Starting Flower Simulation"
    assert not replay(flower_noise, recording, result)
    assert all(replay(line, recording, result) for line in lines)
    assert recording.calls == [
        ("start", 3, 5, True), ("round_started", 3, 2), ("member_done", 3, 1, 2),
        ("round_finished", summary), ("note", "legal: broken.jsonl: line 2"),
    ]
    assert result.summaries == [summary] and result.notes == ["legal: broken.jsonl: line 2"] and result.finished


def test_a_failure_event_carries_the_reason_and_a_torn_line_is_not_an_event(capsys) -> None:
    EventReporter().failed("round 1 aborted: 0 valid updates")
    line = capsys.readouterr().out.strip()
    result = SimulationResult()
    assert replay(line, Recording(), result) and result.failure == "round 1 aborted: 0 valid updates"
    assert not replay(line[:-5], Recording(), SimulationResult())  # cut mid-JSON
    assert not result.finished
    # lines that only look like events are log noise, never a crash of the caller
    for fake in ('[]', '{"event": "start"}', '{"event": "round_finished", "summary": 3}', '{"event": "bogus"}', '"x"'):
        assert not replay(EVENT + fake, Recording(), SimulationResult()), fake
    # an event after other output on the same line (a torn write) still counts
    assert replay("INFO: something" + line, Recording(), SimulationResult())


def test_only_the_last_simulated_node_of_a_free_rider_run_plays_it(tmp_path) -> None:
    last = {"partition-id": 3, "num-partitions": 4}
    assert plays_free_rider(last, {"free-rider": True})
    assert not plays_free_rider(last, {"free-rider": False})
    assert not plays_free_rider(last, {})
    assert not plays_free_rider({"partition-id": 2, "num-partitions": 4}, {"free-rider": True})
    # a SuperNode names its member's data: it never plays the free rider, whatever the run config says
    assert not plays_free_rider({"data-path": str(tmp_path), "member": "acme"}, {"free-rider": True})
    assert not plays_free_rider({"data-path": str(tmp_path), **last}, {"free-rider": True})
    assert not plays_free_rider({"partition-id": 3}, {"free-rider": True})  # malformed: no, and no crash

    class Hints:
        base_path, members_dir, nodes_dir = str(tmp_path / "base"), str(tmp_path / "members"), str(tmp_path / "nodes")

    node = rider_node(Hints())
    assert node.member == FREE_RIDER and node.state_dir == tmp_path / "nodes" / FREE_RIDER


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_a_run_name_is_a_plain_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match="run-name"):
        RunConfig(run_name=name).validated()
    assert RunConfig(run_name="demo-open.2").validated().run_name == "demo-open.2"
