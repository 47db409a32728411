"""The operator's side of secure aggregation in a round: five message exchanges per round.

After TRAIN, the members of each secure-aggregation group (one group of everybody, or the
contribution groups of server/sampling.py) run privacy/secagg.py's protocol through
the Grid: advertise -> share -> mask -> check -> unmask. All groups go through each stage
together, so a round costs five extra round trips however many groups it has (the check: each
survivor signs its group's survivor list, and unmasks only on enough signatures over the same
list, so the server cannot tell members different stories about who dropped). A member that does not answer a
stage within `secagg-timeout`, or whose message is refused, is out of the round from that stage
on (its pairwise masks are rebuilt from its neighbours' shares when it dropped after sharing).
A group that keeps fewer than max(threshold, min-group) members, or fails to unmask, is aborted:
its members' updates are lost for the round and the round loop decides whether the round can go
on without them. When the groups together keep fewer than min-members, nothing is unmasked at
all: a sum the round cannot commit is never revealed (a re-run of the round over other survivors
would otherwise give a second sum to difference against it). Shares that disagree at unmask
are outvoted where the honest holders suffice (`tampered` names the owner); a holder that
provably lied is named in `flagged`, and its own input is in the sum all the same. The server
learns only each group's sum (aggregation/secure.py decodes it).

Memory: a member's masked vector is the one thing of its that is the size of the update. Each is
added to its group's running sum (mod 2^64) as it arrives and dropped (server/grid.py `arriving`,
ServerSession.add_masked), so the server holds one ring vector per group, then one decoded sum
per group (what secure contribution values), however many members reply: O(groups), not
O(members). What it keeps per member is small: keys, shares, signatures, its report.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from aggregation.secure import SecureLayout
from server.faults import kill_point
from server.grid import arriving
from protos.messages import ProtocolError, SecAggMessage, secagg_message_type, secagg_session
from privacy.secagg import InvalidInput, ProtocolViolation, SecAggAborted, SecAggParams
from privacy.secagg_server import ServerSession
from privacy.secagg_wire import KeyAdvert, MaskedInput, UnmaskReply, UnmaskRequest

Sums = tuple[dict[str, torch.Tensor], dict[str, float]]  # (sum_i w_i delta_i, sum_i w_i) per tensor


@dataclass(frozen=True)
class SecureSettings:
    threshold: int  # 0: auto (two thirds of each member's share holders, more than half)
    neighbours: int  # 0: auto (about 2*log2(n), SecAgg+)
    ring_bits: int  # 0: auto (what the sum of the group needs); else at least that
    min_group: int  # fewer survivors than this are never unmasked (contribution min-group)
    timeout: float  # seconds per stage
    seed: int
    min_members: int = 1  # the round commits with this many members: fewer, and nothing is unmasked


@dataclass
class SecureOutcome:
    sums: dict[frozenset[str], Sums] = field(default_factory=dict)  # survivors -> their sums
    dropped: dict[str, str] = field(default_factory=dict)  # member -> stage and reason
    flagged: dict[str, str] = field(default_factory=dict)  # survivor -> misbehaviour at unmask (still summed)
    tampered: dict[str, str] = field(default_factory=dict)  # owner -> secret whose shares disagreed (rebuilt anyway)
    aborted: dict[str, str] = field(default_factory=dict)  # "a+b+c" -> why the group was aborted
    bytes_up: dict[str, int] = field(default_factory=dict)  # member -> secagg bytes sent
    bytes_down: dict[str, int] = field(default_factory=dict)
    member_seconds: dict[str, float] = field(default_factory=dict)  # member -> time on the stages
    server_seconds: float = 0.0  # server-side protocol time (verify, route, unmask, decode)

    @property
    def survivors(self) -> set[str]:
        return set().union(*self.sums) if self.sums else set()


def auto_neighbours(n: int) -> int:
    """SecAgg+'s O(log n) degree: about 2*log2(n) neighbours (everybody below 8 members)."""
    return max(2, math.ceil(2 * math.log2(max(n, 2))))


def threshold_for(holders: int, wanted: int) -> int:
    """t for `holders` share holders: `wanted` if given, else two thirds (always more than half)."""
    if wanted:
        return wanted
    return max(holders // 2 + 1, math.ceil(2 * holders / 3))


def make_params(
    rnd: int, members: Sequence[str], layout: SecureLayout, settings: SecureSettings, index: int, run: str = "",
    nonce: bytes = b"",
) -> SecAggParams:
    """A group's parameters. `nonce`: fresh per attempt at the round, so a re-run is a new session
    (members never advertise in one session twice: signatures of one attempt are no use in another)."""
    n = len(members)
    k = settings.neighbours or auto_neighbours(n)
    degree = min(2 * math.ceil(k / 2), n - 1)
    seed = hashlib.sha256(f"fedmoe-secagg-graph|{settings.seed}|{rnd}|{index}|".encode() + nonce).digest()
    threshold = threshold_for(degree + 1, settings.threshold)
    needed = layout.ring_bits(n, threshold)  # with DP noise, its headroom too
    if settings.ring_bits and settings.ring_bits < needed:
        raise InvalidInput(f"secagg-ring-bits {settings.ring_bits} is too narrow: the sum of {n} members needs {needed}")
    return SecAggParams(
        round=rnd, members=tuple(sorted(members)), threshold=threshold,
        neighbours=k, ring_bits=settings.ring_bits or needed, vector_length=layout.vector_length, graph_seed=seed,
        session=secagg_session(run, index),
    )


@dataclass
class _Group:
    index: int
    name: str
    session: ServerSession
    nodes: dict[str, int]  # member -> node id


def secure_aggregate(
    grid: Grid,
    *,
    rnd: int,
    run: str,
    groups: Sequence[Mapping[str, int]],  # each group: member -> node id
    directory: Mapping[str, Ed25519PublicKey],
    layout: SecureLayout,
    settings: SecureSettings,
    hints: Mapping[str, str],  # base_path, members_dir, nodes_dir (simulated nodes)
    note: Callable[[str], None],
) -> SecureOutcome:
    """The five stages of the protocol (Bonawitz et al.) for every group of the round at once."""
    started = time.perf_counter()
    round_ = _SecureRound(grid, rnd, run, directory, layout, settings, hints, note)
    round_.start(groups)
    forwarded = round_.advertise_keys()
    inboxes = round_.share_keys(forwarded)
    survivors = round_.masked_input_collection(inboxes)
    requests = round_.consistency_check(survivors)
    round_.unmasking(survivors, requests)
    out = round_.out
    out.server_seconds = time.perf_counter() - started - round_.waited
    for member in out.survivors:  # a survivor that went silent at unmask is still summed
        out.dropped.pop(member, None)
    return out


class _SecureRound:
    """One round's groups going through the protocol's stages together, and what came of it."""

    def __init__(
        self, grid: Grid, rnd: int, run: str, directory: Mapping[str, Ed25519PublicKey], layout: SecureLayout,
        settings: SecureSettings, hints: Mapping[str, str], note: Callable[[str], None],
    ) -> None:
        self.grid, self.rnd, self.run, self.directory = grid, rnd, run, directory
        self.layout, self.settings, self.hints, self.note = layout, settings, hints, note
        self.out = SecureOutcome()
        self.live: list[_Group] = []
        self.waited = 0.0  # seconds spent waiting for members (not the server's protocol time)
        self.nonce = os.urandom(16)  # this attempt's: its sessions are new even if the round is re-run

    def start(self, groups: Sequence[Mapping[str, int]]) -> None:
        for index, nodes in enumerate(groups):
            name = "+".join(sorted(nodes))
            try:
                params = make_params(self.rnd, list(nodes), self.layout, self.settings, index, self.run, self.nonce)
                session = ServerSession(params, {m: self.directory[m] for m in nodes}, lenient=True)
            except (InvalidInput, KeyError) as exc:
                self.out.aborted[name] = f"cannot start: {exc}"
                continue
            self.live.append(_Group(index, name, session, dict(nodes)))

    # 0. advertise keys: each member gets the group, its identity directory and the parameters
    def advertise_keys(self) -> dict[int, dict[str, dict[str, KeyAdvert]]]:
        def setup(group: _Group) -> dict[str, dict[str, object]]:
            p = group.session.params
            fields: dict[str, object] = {
                "group": list(p.members), "threshold": p.threshold, "neighbours": p.neighbours, "ring-bits": p.ring_bits,
                "vector-length": p.vector_length, "graph-seed": p.graph_seed,
            }
            return {m: fields for m in p.members}

        replies = self.exchange_stage("advertise", setup)
        forwarded: dict[int, dict[str, dict[str, KeyAdvert]]] = {}
        for group in list(self.live):
            adverts = {
                m: KeyAdvert(m, self.rnd, *(r.fields[f] for f in ("c-pub", "s-pub", "b-commitment", "signature")))  # type: ignore[arg-type]
                for m, r in replies[group.index].items()
            }
            result = self.settle(group, lambda g=group, a=adverts: g.session.receive_adverts(a))
            if result is not None:
                forwarded[group.index] = result  # type: ignore[assignment]
        return forwarded

    # 1. share keys: each member gets its neighbours' adverts, returns encrypted shares
    def share_keys(self, forwarded: dict[int, dict[str, dict[str, KeyAdvert]]]) -> dict[int, dict[str, dict[str, bytes]]]:
        def adverts_of(group: _Group) -> dict[str, dict[str, object]]:
            out_fields = {}
            for member, neighbours in forwarded[group.index].items():
                senders = sorted(neighbours)
                out_fields[member] = {
                    "senders": senders,
                    "c-pubs": [neighbours[s].c_pub for s in senders], "s-pubs": [neighbours[s].s_pub for s in senders],
                    "b-commitments": [neighbours[s].b_commitment for s in senders],
                    "signatures": [neighbours[s].signature for s in senders],
                }
            return out_fields

        replies = self.exchange_stage("share", adverts_of)
        inboxes: dict[int, dict[str, dict[str, bytes]]] = {}
        for group in list(self.live):
            shares = {}
            for m, r in replies[group.index].items():
                try:
                    shares[m] = r.pairs("receivers", "ciphertexts")
                except ProtocolError as exc:
                    self.out.dropped.setdefault(m, f"share: {exc}")
            result = self.settle(group, lambda g=group, s=shares: g.session.receive_shares(s))
            if result is not None:
                inboxes[group.index] = result  # type: ignore[assignment]
        return inboxes

    # 2. masked input collection: each member gets the shares addressed to it, returns its masked
    #    vector, which is added to its group's running sum as it arrives and dropped (O(groups) held)
    def masked_input_collection(self, inboxes: dict[int, dict[str, dict[str, bytes]]]) -> dict[int, list[str]]:
        for group, member, reply in self.stage_replies("mask", lambda g: {
            m: {"senders": sorted(inbox), "ciphertexts": [inbox[s] for s in sorted(inbox)]}
            for m, inbox in inboxes[g.index].items()
        }):
            self.fold_masked(group, member, reply)
        survivors: dict[int, list[str]] = {}
        smallest = self.settings.min_group
        for group in list(self.live):
            folded = group.name not in self.out.aborted
            result = self.guarded(group, group.session.receive_masked) if folded else None
            self.refused(group)
            alive = result[0] if result is not None else set()  # type: ignore[index]
            if result is not None and len(alive) < max(smallest, group.session.params.threshold):
                self.out.aborted[group.name] = (
                    f"only {len(alive)} member(s) sent masked inputs; a group is unmasked with at least "
                    f"{max(smallest, group.session.params.threshold)}"
                )
                result = None
            if result is None:
                self.live.remove(group)
            else:
                survivors[group.index] = sorted(alive)
        self.too_few_to_commit(sum(len(s) for s in survivors.values()), "sent masked inputs")
        return survivors

    # 3. consistency check: each survivor signs the survivor list of its group (Bonawitz et al.)
    def consistency_check(self, survivors: dict[int, list[str]]) -> dict[int, dict[str, UnmaskRequest]]:
        replies = self.exchange_stage("check", lambda g: {m: {"survivors": survivors[g.index]} for m in survivors[g.index]})
        requests: dict[int, dict[str, UnmaskRequest]] = {}
        for group in list(self.live):
            signatures = {m: r.fields["signature"] for m, r in replies[group.index].items()}
            result = self.settle(group, lambda g=group, x=signatures: g.session.receive_signatures(x))  # type: ignore[arg-type]
            if result is not None:
                requests[group.index] = group.session.unmask_requests()
        self.too_few_to_commit(sum(len(survivors[i]) for i in requests), "passed the survivor-list check")
        return requests

    def too_few_to_commit(self, unmaskable: int, what: str) -> None:
        if unmaskable < self.settings.min_members:
            # A sum the round cannot commit is never revealed: the round would be re-run with the same
            # state, and a second sum over other survivors could be differenced against this one.
            # (Necessary, not sufficient: a group can still fail at unmask after another unmasked;
            # the members' own record of what they helped unmask covers that, client/secure.py.)
            for group in self.live:
                self.out.aborted[group.name] = (
                    f"only {unmaskable} member(s) {what} in the round's groups, fewer than "
                    f"min-members {self.settings.min_members}: nothing is unmasked"
                )
            self.live.clear()

    # 4. unmasking: signers get every signature over their list and reveal the shares it calls for
    def unmasking(self, survivors: dict[int, list[str]], requests: dict[int, dict[str, UnmaskRequest]]) -> None:
        replies = self.exchange_stage("unmask", lambda g: {
            m: {"signers": sorted(r.signatures), "signatures": [r.signatures[s] for s in sorted(r.signatures)]}
            for m, r in requests[g.index].items()
        })
        for group in self.live:
            answers = {}
            for m, r in replies[group.index].items():
                try:
                    answers[m] = UnmaskReply(m, self.rnd, r.pairs("b-owners", "b-shares"), r.pairs("s-owners", "s-shares"))
                except ProtocolError as exc:
                    self.out.dropped.setdefault(m, f"unmask: {exc}")
            total = self.guarded(group, lambda g=group, a=answers: g.session.finish(a))
            self.out.flagged.update(group.session.refused)  # e.g. a provably tampered share: named, and still summed
            self.out.tampered.update(group.session.tampered)
            group.session.refused.clear()
            if total is None:
                continue
            summed = frozenset(survivors[group.index])
            try:
                params = group.session.params
                self.out.sums[summed] = self.layout.decode_sum(  # type: ignore[arg-type]
                    total, len(summed), threshold=params.threshold, ring_bits=params.ring_bits)
            except ValueError as exc:
                self.out.aborted[group.name] = f"sum does not decode: {exc}"

    def fold_masked(self, group: _Group, member: str, reply: SecAggMessage) -> None:
        """A masked vector into its group's running sum (ServerSession.add_masked); nothing kept."""
        if group.name not in self.out.aborted:
            masked = MaskedInput(member, self.rnd, reply.fields["packed"])  # type: ignore[arg-type]
            self.guarded(group, lambda: group.session.add_masked(member, masked))

    def exchange_stage(
        self, stage: str, outgoing: Callable[[_Group], dict[str, dict[str, object]]]
    ) -> dict[int, dict[str, SecAggMessage]]:
        """One exchange for every live group; replies per group index, member -> message."""
        got: dict[int, dict[str, SecAggMessage]] = {g.index: {} for g in self.live}
        for group, member, reply in self.stage_replies(stage, outgoing):
            got[group.index][member] = reply
        return got

    def stage_replies(
        self, stage: str, outgoing: Callable[[_Group], dict[str, dict[str, object]]]
    ) -> Iterator[tuple[_Group, str, SecAggMessage]]:
        """One exchange for every live group: each reply that counts as it arrives, none kept;
        then the members that did not answer are dropped."""
        out, rnd = self.out, self.rnd
        messages, sent_to = [], {}
        for group in self.live:
            for member, fields in outgoing(group).items():
                msg = SecAggMessage(stage=stage, run=self.run, round=rnd, group=group.index, member="", fields=fields, **self.hints)
                content = msg.to_record()
                node = group.nodes[member]
                out.bytes_down[member] = out.bytes_down.get(member, 0) + recorddict_to_proto(content).ByteSize()
                messages.append(Message(content=content, message_type=secagg_message_type(stage), dst_node_id=node, group_id=f"{rnd}"))
                sent_to[(node, group.index)] = member
        groups = {g.index: g for g in self.live}
        answered: set[tuple[int, int]] = set()
        t0, handling = time.perf_counter(), 0.0
        for reply in arriving(self.grid, messages, self.settings.timeout, poll=0.05):
            started = time.perf_counter()
            accepted = self.accept_reply(stage, reply, sent_to, answered)
            if accepted is not None:
                yield groups[accepted[0]], accepted[1], accepted[2]
                kill_point(f"in-{stage}")  # the stage's first reply counted (mask: folded), the rest not yet
            handling += time.perf_counter() - started  # the server's protocol time (the caller's too), not waiting
        self.waited += time.perf_counter() - t0 - handling
        for key, member in sent_to.items():
            if key not in answered:
                out.dropped.setdefault(member, f"{stage}: no reply within {self.settings.timeout:g}s")

    def accept_reply(
        self, stage: str, reply: Message, sent_to: Mapping[tuple[int, int], str], answered: set[tuple[int, int]]
    ) -> tuple[int, str, SecAggMessage] | None:
        """(group index, member, parsed reply) for a reply that counts; None for one that drops its
        node (an error, a malformed reply) or is refused (labelled for another member, round or
        run, or a second reply to one message: the first counts)."""
        out, rnd, node = self.out, self.rnd, reply.metadata.src_node_id
        matches = [(n, g) for (n, g) in sent_to if n == node]
        if reply.has_error():
            for key in matches:
                answered.add(key)
                out.dropped.setdefault(sent_to[key], f"{stage}: {reply.error.reason}")
            return None
        try:
            parsed = SecAggMessage.from_record(reply.content, stage=stage, reply=True)
        except ProtocolError as exc:
            for key in matches:
                answered.add(key)
                out.dropped.setdefault(sent_to[key], f"{stage}: {exc}")
            return None
        key = (node, parsed.group)
        member = sent_to.get(key)
        if member is None or parsed.member != member or parsed.round != rnd or parsed.run != self.run or key in answered:
            self.note(f"round {rnd}: secagg {stage}: refused a reply from node {node} (labelled {parsed.member!r}, round {parsed.round})")
            return None
        answered.add(key)
        out.bytes_up[member] = out.bytes_up.get(member, 0) + recorddict_to_proto(reply.content).ByteSize()
        out.member_seconds[member] = out.member_seconds.get(member, 0.0) + float(parsed.fields["seconds"])  # type: ignore[arg-type]
        return parsed.group, member, parsed

    def guarded(self, group: _Group, step: Callable[[], object]) -> object:
        try:
            return step()
        except (SecAggAborted, ProtocolViolation, ProtocolError, ValueError) as exc:
            self.out.aborted[group.name] = str(exc)
            return None

    def refused(self, group: _Group) -> None:
        for member, why in group.session.refused.items():
            self.out.dropped.setdefault(member, f"refused: {why}")
        group.session.refused.clear()

    def settle(self, group: _Group, step: Callable[[], object]) -> object:
        """One group's server step: a refusal drops members, an abort drops the group."""
        result = self.guarded(group, step)
        self.refused(group)
        if result is None:
            self.live.remove(group)
        return result
