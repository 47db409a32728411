"""The round's first stage: which nodes train this round, as which members, in which groups.

Open rounds and plain secure rounds sample nodes; secure contribution plans its groups by member
name (asked with a HELLO exchange), since Flower node ids change when a node restarts and a
re-run round must train the same group again (client/secure.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from aggregation.groups import random_groups, rotating_subsets
from aggregation.schedule import RoundRecord, decide
from protos.messages import HELLO, MEMBER_NAME, Hello, ProtocolError
from server.binding import MemberBinding
from server.config import RunConfig
from server.grid import exchange
from server.workspace import Workspace

T = TypeVar("T", int, str)  # a node id or a member name


@dataclass(frozen=True)
class Roster:
    nodes: list[int]  # the nodes sent TRAIN this round
    groups: list[list[int]]  # secure-aggregation groups of those nodes (one group when not planned)
    planned: dict[int, str]  # secure contribution: node -> the member it said it is (else empty)


def plan_round(
    config: RunConfig, manifests: Callable[[], Sequence[dict[str, Any]]], rnd: int, note: Callable[[str], None]
) -> tuple[RunConfig, str]:
    """The round's config: local steps and members per round as the schedule decides from the
    committed rounds (aggregation/schedule.py); a fixed schedule keeps the run's config as it is
    and reads no manifest."""
    history = [record_of(m, config) for m in manifests()] if config.schedule == "adaptive" else []
    decision = decide(
        history, config.schedule_config(),
        local_steps=config.local_steps, members_per_round=config.members_per_round, min_members=config.min_members,
    )
    if config.schedule == "fixed":
        return config, decision.reason
    note(f"round {rnd}: {decision.reason}")
    return replace(config, local_steps=decision.local_steps, members_per_round=decision.members_per_round), decision.reason


def record_of(manifest: dict[str, Any], config: RunConfig) -> RoundRecord:
    """What the schedule needs of a committed round, from its manifest (resumes decide the same)."""
    members = manifest.get("members", [])
    steps = int(manifest.get("run_config", {}).get("local-steps", config.local_steps)) if members else 0
    losses = list(manifest["val_loss"].values())
    return RoundRecord(
        round=int(manifest["round"]), local_steps=steps, members=len(members),
        val_loss=sum(losses) / len(losses),
        bytes_per_member=(manifest.get("bytes_up", 0) + manifest.get("bytes_down", 0)) / max(len(members), 1),
        seconds_per_step=max((float(m["seconds"]) for m in members), default=0.0) / max(steps, 1),
        drift=manifest.get("drift"),
    )


def sample_members(
    grid: Grid, config: RunConfig, ws: Workspace, node_member: dict[int, str], rnd: int, note: Callable[[str], None],
    binding: MemberBinding,
    sitting_out: set[str] = frozenset(),  # type: ignore[assignment]
) -> Roster:
    """The round's roster; `node_member` learns the members of nodes it did not know (each name
    checked against `binding`: a node cannot take another's name). Members `sitting_out` (past
    their probation: server/rights.py) are not sampled, unless that would leave the round too few
    members to run (then everybody is, with a note)."""
    nodes = wait_for_nodes(grid, config.min_members, config.round_timeout)
    if not (config.secagg == "on" and config.contribution_mode == "secure"):
        nodes = members_of_round(eligible(nodes, lambda n: node_member.get(n) in sitting_out, config, rnd, note), config, rnd)
        return Roster(nodes=nodes, groups=[nodes], planned={})
    # Plan by member name, not Flower node id (ids change on restart): a re-run round must
    # train the same group, or its members refuse to unmask it (client/secure.py).
    unknown = [n for n in nodes if n not in node_member]
    if unknown:
        hints = Hello("", str(ws.base), str(ws.members_dir), str(ws.root / "nodes"))
        node_member.update(ask_members(grid, unknown, hints, config.secagg_timeout, note, binding))
    # one node per member: every name in node_member was bound to its node (server/binding.py)
    member_node = {node_member[n]: n for n in nodes if n in node_member}
    members = members_of_round(eligible(sorted(member_node), lambda m: m in sitting_out, config, rnd, note), config, rnd)
    groups = plan_groups(members, config.contribution_min_group, seed=config.seed, rnd=rnd, min_members=config.min_members)
    planned = {member_node[m]: m for group in groups for m in group}
    return Roster(nodes=sorted(planned), groups=[[member_node[m] for m in group] for group in groups], planned=planned)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def eligible(candidates: list[T], sits_out: Callable[[T], bool], config: RunConfig, rnd: int,
             note: Callable[[str], None]) -> list[T]:
    """The candidates not sitting out, or all of them when those are fewer than the round needs
    (min-members; secure contribution: a group of contribution-min-group): sitting members out
    must never stop the consortium."""
    kept = [c for c in candidates if not sits_out(c)]
    secure = config.secagg == "on" and config.contribution_mode == "secure"
    need = max(config.min_members, config.contribution_min_group if secure else 1)
    if len(kept) < len(candidates) and len(kept) < need:
        note(f"round {rnd}: only {len(kept)} member(s) past probation are entitled to train, the round needs "
             f"{need}: everybody trains this round")
        return candidates
    return kept


def members_of_round(candidates: list[T], config: RunConfig, rnd: int) -> list[T]:
    """The round's seeded sample of `members-per-round` candidates (all of them when 0)."""
    if not config.members_per_round:
        return candidates
    return sorted(random.Random(config.seed * 100_003 + rnd).sample(candidates, min(len(candidates), config.members_per_round)))


def plan_groups(members: Sequence[str], min_group: int, *, seed: int, rnd: int, min_members: int = 1) -> list[list[str]]:
    """Secure contribution: which members train this round, in which secure-aggregation group.

    With at least 2*min_group members: everybody, in disjoint random groups of >= min_group.
    With fewer, one group cannot be split without revealing a sum of fewer than min_group, so
    the round trains one group of min_group members (or min_members, if the round needs more to
    commit) from a balanced rotation, and the others sit out: rounds of different groups are
    what makes members separable (the secure-mode group estimator).
    Deterministic in (members, min_group, seed, rnd) -- by member name, not Flower node id, so
    a round re-run after a restart (new node ids) trains the same group again, which its
    members insist on when its sum was already unmasked (client/secure.py).
    """
    if len(members) >= 2 * min_group:
        return [sorted(g) for g in random_groups(members, min_group, rng=random.Random(f"fedmoe-groups|{seed}|{rnd}"))]
    if len(members) <= min_group:
        return [sorted(members)]
    size = max(min_group, min(min_members, len(members)))
    return [sorted(rotating_subsets(members, size, rnd - 1, seed=f"fedmoe-groups|{seed}"))]


def ask_members(grid: Grid, nodes: Sequence[int], hints: Hello, timeout: float, note: Callable[[str], None],
                binding: MemberBinding) -> dict[int, str]:
    """node -> member, from a HELLO exchange; nodes that do not answer, or answer with a name
    that is not theirs to use (`binding`), are left out."""
    messages = [Message(content=hints.to_record(), message_type=HELLO, dst_node_id=n, group_id="hello") for n in nodes]
    said: dict[int, str] = {}
    for reply in exchange(grid, messages, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            note(f"node {node} did not say which member it is: {reply.error.reason}")
            continue
        try:
            member = Hello.from_record(reply.content).member
        except ProtocolError as exc:
            note(f"node {node}: {exc}")
            continue
        if not MEMBER_NAME.fullmatch(member):
            note(f"node {node} said it is {member!r}, not a member name (letters, digits, '.', '_', '-')")
            continue
        said[node] = member
    refused = binding.settle(said)  # all answers first: arrival order must not decide a name
    for node in sorted(refused):
        note(f"hello refused: {refused[node]}")
    return {node: member for node, member in said.items() if node not in refused}
