"""The round's validation stage: every TRAIN reply checked where it arrives, before it counts.

A reply is parsed strictly (protos/), its round and member checked against what the round
planned, its update decoded under the codec's bounds and checked tensor by tensor (names,
shapes, finite), its self-reported counts bounded by the round's token budget. A reply that
fails is one rejection naming the node and why; the round goes on without it.

Open rounds keep every valid update decoded until the round is scored and aggregated: O(members)
updates in memory, inherently. The norm bound needs the round's median norm, a robust aggregator
each coordinate's order statistics, GTG-Shapley and the free-rider checks each member's own
update, and the token-weighted mean adds members in name order so that it does not depend on the
order replies arrive in. Secure rounds hold no update here (a TRAIN reply carries none): their
masked vectors are folded into one sum per group as they arrive (server/secure.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from aggregation.codec import UpdateRejected, decode
from aggregation.fedavg import Update
from aggregation.robust import bound_norms
from model.lora import expert_of
from protos.messages import ProtocolError, TrainReply
from server.binding import MemberBinding
from server.config import RunConfig
from server.identities import Identities
from server.sampling import Roster
from server.summary import MemberReport


EXPERT_GROUP = re.compile(r"(0|[1-9][0-9]{0,5}):(0|[1-9][0-9]{0,5})")  # 'layer:expert', as model/lora.py names them


@dataclass
class Received:
    """What the round's valid replies brought: updates (open) and one report per member."""

    updates: list[Update] = field(default_factory=list)  # open rounds only: secure ones hold theirs masked
    reports: list[MemberReport] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node or member -> reason


def validate_replies(
    replies: list[Message],
    roster: Roster,
    *,
    rnd: int,
    config: RunConfig,
    shapes: dict[str, tuple[int, ...]],
    codec_seed: int,
    bytes_down: dict[int, int],
    identities: Identities,
    node_member: dict[int, str],
    held_views: dict[str, str],
    note: Callable[[str], None],
    binding: MemberBinding,
) -> Received:
    """Check every reply; `node_member` and `held_views` learn what the valid ones say. A reply
    speaks for the member its node is bound to (`binding`), and for one member once a round."""
    secure = config.secagg == "on"
    received = Received()
    replied: dict[str, int] = {}  # member -> the node whose reply counted this round
    parsed_replies = {id(r): parse_reply(r) for r in replies}  # each parsed once
    refused = binding.settle({r.metadata.src_node_id: p.member for r in replies
                              if isinstance(p := parsed_replies[id(r)], TrainReply)})
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            held_views.pop(node_member.get(node, ""), None)  # resend the full state next time
            received.rejected[f"node {node}"] = reply.error.reason
            note(f"round {rnd}: {reply.error.reason}")
            node_member.pop(node, None)  # ask it again next round
            continue
        try:
            parsed = parsed_replies[id(reply)]
            if isinstance(parsed, ProtocolError):
                raise parsed
            if node in refused:
                raise UpdateRejected(refused[node])
            if parsed.member in replied:
                raise UpdateRejected(f"member {parsed.member!r}: a second reply this round (nodes {replied[parsed.member]} and {node})")
            if parsed.round != rnd:
                raise UpdateRejected(f"member {parsed.member!r}: reply for round {parsed.round}, expected {rnd}")
            if roster.planned and roster.planned.get(node) != parsed.member:
                raise UpdateRejected(
                    f"node {node} said it is {roster.planned.get(node)!r} but replied as {parsed.member!r}; its group was planned for the former"
                )
            if secure:
                if parsed.update:
                    raise UpdateRejected(f"member {parsed.member!r}: sent its update in the clear under secure aggregation")
                if parsed.expert_tokens:  # they would tell the operator which experts the member's data uses
                    raise UpdateRejected(f"member {parsed.member!r}: sent per-expert token counts in the clear under secure aggregation")
                check_counts(parsed, config)
                identities.pin(parsed.member, parsed.identity)
            else:
                received.updates.append(validate_update(parsed, shapes, config, codec_seed=codec_seed))
        except (ProtocolError, UpdateRejected, ValueError) as exc:
            received.rejected[f"node {node}"] = str(exc)
            note(f"round {rnd}: rejected: {exc}")
            node_member.pop(node, None)
            continue
        node_member[node] = parsed.member
        replied[parsed.member] = node
        held_views[parsed.member] = parsed.view_sha256
        received.reports.append(MemberReport(
            member=parsed.member, node_id=node, bytes_down=bytes_down[node],
            bytes_up=recorddict_to_proto(reply.content).ByteSize(),
            num_tokens=parsed.num_tokens, train_loss=parsed.train_loss, seconds=parsed.seconds,
            experts_sent=len(parsed.expert_tokens), precision=parsed.precision,
            dp_epsilon=parsed.dp_epsilon, dp_delta=parsed.dp_delta,
        ))
    if not secure and config.update_norm_bound > 0:
        bounded = bound_norms(received.updates, config.update_norm_bound)
        for member, ratio in sorted(bounded.clipped.items()):
            note(f"round {rnd}: member {member!r}: update L2 norm {ratio:.1f}x the round's median, "
                 f"scaled down to {config.update_norm_bound:g}x")
        received.updates = bounded.updates
    missing = len(roster.nodes) - len(replies)
    if missing:
        note(f"round {rnd}: {missing} member(s) did not reply within {config.round_timeout:.0f}s")
    return received


def reject_members(received: Received, members: set[str], why: str, rnd: int, note: Callable[[str], None]) -> None:
    """Take `members` out of the round after validation (their updates and reports), one line each."""
    for member in sorted(members):
        received.rejected[member] = f"member {member!r}: {why}"
        note(f"round {rnd}: rejected: member {member!r}: {why}")
    received.updates = [u for u in received.updates if u.member not in members]
    received.reports = [r for r in received.reports if r.member not in members]


def parse_reply(reply: Message) -> TrainReply | ProtocolError | None:
    """A TRAIN reply parsed (strict), the ProtocolError that refuses it, or None for an error reply."""
    if reply.has_error():
        return None
    try:
        return TrainReply.from_record(reply.content)
    except ProtocolError as exc:
        return exc


def validate_update(
    reply: TrainReply, shapes: dict[str, tuple[int, ...]], config: RunConfig, *, codec_seed: int = 0
) -> Update:
    """Decode (strict, bounded) and check a member's update: names, shapes, finite, counts."""
    delta = decode(
        reply.update, shapes, member=reply.member, max_bytes=config.max_update_bytes,
        seed=codec_seed, config=config.codec_config(),
    )
    for name, tensor in delta.items():
        if name not in shapes:
            raise UpdateRejected(f"member {reply.member!r}: unknown tensor {name!r}")
        if tuple(tensor.shape) != shapes[name]:
            raise UpdateRejected(
                f"member {reply.member!r}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}"
            )
        if not torch.isfinite(tensor).all():
            raise UpdateRejected(f"member {reply.member!r}: tensor {name!r} has NaN or Inf")
    check_counts(reply, config)
    sent = {g for name in delta if (g := expert_of(name)) is not None}
    for group in reply.expert_tokens:
        if group not in sent:  # the counts weight the expert's average and the consortium's load
            raise UpdateRejected(f"member {reply.member!r}: expert-tokens[{group}] counts tokens for an expert it sent no update for")
    return Update(
        member=reply.member,
        delta={k: v.float() for k, v in delta.items()},
        num_tokens=reply.num_tokens,
        expert_tokens=dict(reply.expert_tokens),
    )


def check_counts(reply: TrainReply, config: RunConfig) -> None:
    """Self-reported numbers, checked where they arrive: tokens within the round's budget, each
    expert's tokens within the member's (a token reaches an expert at most once per layer), the
    loss and seconds finite and non-negative, a DP ε finite and non-negative at a δ in (0, 1)."""
    budget = config.token_budget
    if not 0 < reply.num_tokens <= budget:
        raise UpdateRejected(f"member {reply.member!r}: num-tokens {reply.num_tokens} outside (0, {budget}]")
    for group, count in reply.expert_tokens.items():
        if not EXPERT_GROUP.fullmatch(group):
            raise UpdateRejected(f"member {reply.member!r}: expert-tokens names {group!r}, not an expert ('layer:expert')")
        if not 0 <= count <= reply.num_tokens:
            raise UpdateRejected(
                f"member {reply.member!r}: expert-tokens[{group}] = {count} outside [0, num-tokens {reply.num_tokens}]"
            )
    dp = (("dp-epsilon", reply.dp_epsilon),) if reply.dp_epsilon is not None else ()
    for field, value in (("seconds", reply.seconds), ("train-loss", reply.train_loss), *dp):
        if not (math.isfinite(value) and value >= 0):
            raise UpdateRejected(f"member {reply.member!r}: {field} {value} is not a finite number >= 0")
    if reply.dp_epsilon is not None and not (reply.dp_delta is not None and 0 < reply.dp_delta < 1):
        raise UpdateRejected(f"member {reply.member!r}: dp-delta {reply.dp_delta} is not in (0, 1)")
