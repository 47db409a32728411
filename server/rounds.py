"""The operator's round loop: sample members, send the trainable state, validate replies,
aggregate per expert, evaluate per domain, commit. Reads top to bottom like a training script.

It talks to Flower only through the `Grid` it is given, so the same loop runs in Flower's
simulation engine and in a real SuperLink deployment.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.serverapp import Grid

from aggregation.broadcast import advance, view_digest
from aggregation.codec import UpdateRejected, decode
from aggregation.contribution import ScoreBook, contribution_shares
from aggregation.group_estimator import GroupValueEstimator
from aggregation.groups import random_groups, rotating_subsets
from aggregation.fedavg import Update, aggregate
from aggregation.secure import TOKENS, SecureLayout
from model.precision import select_precision
from server.config import RunConfig
from protos.messages import HELLO, TRAIN, Hello, ProtocolError, TrainInstruction, TrainReply
from server.workspace import Workspace
from model.base import Base, load_base
from model.corpus import read_texts
from model.io import tensors_to_bytes
from model.lora import LoraMoE, expert_of
from model.moe import evaluate_loss
from model.tokenizer import pack
from server.checkpoint import Checkpoints
from server.grid import exchange
from server.ledger import Ledger, OperatorKey, Record, utc_now
from server.scoring import CoalitionValue, combine_group_sums, open_value, score_groups, score_open
from server.secure import SecureSettings, secure_aggregate

log = logging.getLogger("fedmoe.server")


class RoundAborted(RuntimeError):
    """Too few valid updates: nothing is committed, the global state stays as it was."""


@dataclass(frozen=True)
class MemberReport:
    member: str
    node_id: int
    bytes_down: int
    bytes_up: int
    num_tokens: int
    train_loss: float
    seconds: float
    experts_sent: int
    precision: str
    secagg_seconds: float = 0.0  # the member's time on the secure-aggregation stages


@dataclass(frozen=True)
class RoundSummary:
    round: int
    val_loss: dict[str, float]
    members: list[MemberReport] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # member or node -> reason
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # contribution this round (val-loss drop)
    shares: dict[str, float] = field(default_factory=dict)  # cumulative contribution shares
    contribution: dict[str, object] = field(default_factory=dict)  # how scores were computed

    @property
    def bytes_up(self) -> int:
        return sum(m.bytes_up for m in self.members)

    @property
    def bytes_down(self) -> int:
        return sum(m.bytes_down for m in self.members)


class Reporter(Protocol):
    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None: ...
    def round_started(self, rnd: int, num_members: int) -> None: ...
    def member_done(self, rnd: int, done: int, total: int) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...
    def note(self, text: str) -> None: ...


class LogReporter:
    """Progress through Flower's log (a deployed ServerApp has no terminal of its own)."""

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        log.info("fedmoe: rounds %d..%d%s", first_round, num_rounds, " (resumed)" if resumed else "")

    def round_started(self, rnd: int, num_members: int) -> None:
        log.info("round %d: sent to %d members", rnd, num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        pass

    def round_finished(self, summary: RoundSummary) -> None:
        losses = ", ".join(f"{d}={v:.3f}" for d, v in summary.val_loss.items())
        log.info("round %d committed: val loss %s", summary.round, losses)

    def note(self, text: str) -> None:
        log.warning("%s", text)


def validation_sets(ws: Workspace, base: Base, config: RunConfig) -> dict[str, torch.Tensor]:
    """The operator's held-out validation blocks per domain (capped to eval-batches batches)."""
    cap = config.eval_batches * config.batch_size * config.seq_len
    sets = {}
    for domain in ws.validation_domains():
        path = ws.validation_dir / f"{domain}.jsonl"
        sets[domain] = pack(base.tokenizer, read_texts(path), config.seq_len, cap + 1, source=str(path))
    if not sets:
        raise FileNotFoundError(f"{ws.validation_dir}: no validation sets (run `fedmoe init`)")
    return sets


def evaluate(lora: LoraMoE, sets: dict[str, torch.Tensor], config: RunConfig) -> dict[str, float]:
    precision = select_precision(config.precision)
    model = lora.model.to(precision.device)
    losses = {
        domain: evaluate_loss(
            model, blocks, batch_size=config.batch_size, device=precision.device,
            autocast_dtype=precision.autocast_dtype,
        )
        for domain, blocks in sets.items()
    }
    model.to("cpu")
    return losses


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
    return Update(
        member=reply.member,
        delta={k: v.float() for k, v in delta.items()},
        num_tokens=reply.num_tokens,
        expert_tokens=dict(reply.expert_tokens),
    )


def check_counts(reply: TrainReply, config: RunConfig) -> None:
    """Self-reported counts are bounded by the round's token budget and never exceed it."""
    budget = config.local_steps * config.batch_size * config.seq_len
    top_k_budget = budget * 8  # a token is routed to k experts per layer; k <= 8 in practice
    if not 0 < reply.num_tokens <= budget:
        raise UpdateRejected(f"member {reply.member!r}: num-tokens {reply.num_tokens} outside (0, {budget}]")
    for group, count in reply.expert_tokens.items():
        if not 0 <= count <= top_k_budget:
            raise UpdateRejected(f"member {reply.member!r}: expert-tokens[{group}] = {count} out of range")


class Identities:
    """Members' long-term Ed25519 keys for secure aggregation, pinned on first sight.

    Kept in <workspace>/operator/identities.json (member -> hex). An operator may pre-register
    keys there (e.g. exchanged when a member joins); a member that later shows another key is
    refused for the round, since its secure-aggregation adverts could not be trusted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def pin(self, member: str, key: bytes) -> None:
        if len(key) != 32:
            raise UpdateRejected(f"member {member!r}: identity key is {len(key)} bytes, expected 32 (Ed25519)")
        known = self.keys.get(member)
        if known is not None and known != key.hex():
            raise UpdateRejected(f"member {member!r}: identity key differs from the one pinned in {self.path}")
        if known is None:
            self.keys[member] = key.hex()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.keys, sort_keys=True, indent=1) + "\n")
            tmp.replace(self.path)

    def directory(self) -> dict[str, Ed25519PublicKey]:
        return {m: Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for m, h in self.keys.items()}


def plan_groups(members: Sequence[str], min_group: int, *, seed: int, rnd: int, min_members: int = 1) -> list[list[str]]:
    """Secure contribution: which members train this round, in which secure-aggregation group.

    With at least 2*min_group members: everybody, in disjoint random groups of >= min_group.
    With fewer, one group cannot be split without revealing a sum of fewer than min_group, so
    the round trains one group of min_group members (or min_members, if the round needs more to
    commit) from a balanced rotation, and the others sit out: rounds of different groups are
    what makes members separable (aggregation/contribution.py, GroupValueEstimator).
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


_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def ask_members(grid: Grid, nodes: Sequence[int], hints: Hello, timeout: float, note: Callable[[str], None]) -> dict[int, str]:
    """node -> member, from a HELLO exchange; nodes that do not answer are left out."""
    messages = [Message(content=hints.to_record(), message_type=HELLO, dst_node_id=n, group_id="hello") for n in nodes]
    found: dict[int, str] = {}
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
        if not _MEMBER_NAME.fullmatch(member):
            note(f"node {node} said it is {member!r}, not a member name (letters, digits, '.', '_', '-')")
            continue
        found[node] = member
    return found


T = TypeVar("T", int, str)  # a node id or a member name


def _members_of_round(candidates: list[T], config: RunConfig, rnd: int) -> list[T]:
    """The round's seeded sample of `members-per-round` candidates (all of them when 0)."""
    if not config.members_per_round:
        return candidates
    return sorted(random.Random(config.seed * 100_003 + rnd).sample(candidates, min(len(candidates), config.members_per_round)))


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def run_rounds(grid: Grid, config: RunConfig, reporter: Reporter, *, run_name: str = "default") -> list[RoundSummary]:
    ws = Workspace(config.workspace_path)
    base = load_base(ws.base)
    lora = base.with_lora()
    shapes = lora.shapes()
    val_sets = validation_sets(ws, base, config)
    contribution_sets = {d: blocks[: config.contribution_batches * config.batch_size] for d, blocks in val_sets.items()}
    precision = select_precision(config.precision)
    book = ScoreBook()
    checkpoints = Checkpoints(ws.run_dir(run_name))
    summaries: list[RoundSummary] = []
    held_views: dict[str, str] = {}  # member -> digest of the view it holds
    node_member: dict[int, str] = {}

    secure = config.secagg == "on"
    identities = Identities(ws.operator_dir / "identities.json")
    # secure contribution: group values -> member values. Unconstrained least squares: a harmful
    # member is truly negative, and forcing it to 0 would push its group-mates' values around;
    # negative totals are clipped to 0 only when they become shares.
    estimator = GroupValueEstimator(nonnegative=False)
    ledger = Ledger(ws.ledger(run_name), OperatorKey.load_or_create(ws.operator_key))
    committed = checkpoints.load()
    view: dict[str, torch.Tensor] | None = None  # the view members trained from last round
    if committed is None:
        state = lora.get_state()
        summary = RoundSummary(round=0, val_loss=evaluate(lora, val_sets, config))
        checkpoints.commit(0, state, _manifest(summary, base, config))
        first = 1
    else:
        if set(committed.state) != set(shapes):
            raise RuntimeError(f"{checkpoints.run_dir}: committed state does not match the base's trainable state")
        state = committed.state
        view = committed.view
        record_in_ledger(ledger, checkpoints, config)  # rounds committed before a crash
        for manifest in checkpoints.manifests()[1:]:  # the score book is rebuilt from committed rounds
            how = manifest.get("contribution", {})
            if how.get("mode") == "secure":
                estimator = estimator.observe({frozenset(g["members"]): g["value"] for g in how["groups"]})
            else:
                book = book.add(manifest["round"], manifest.get("scores", {}))
        first = committed.round + 1
    reporter.start(first, config.num_rounds, resumed=committed is not None)

    for rnd in range(first, config.num_rounds + 1):
        started = time.perf_counter()
        nodes = wait_for_nodes(grid, config.min_members, config.round_timeout)
        planned: dict[int, str] = {}  # secure contribution: node -> the member it said it is
        if secure and config.contribution_mode == "secure":
            # Plan by member name, not Flower node id (ids change on restart): a re-run round must
            # train the same group, or its members refuse to unmask it (client/secure.py).
            unknown = [n for n in nodes if n not in node_member]
            if unknown:
                hints = Hello("", str(ws.base), str(ws.members_dir), str(ws.root / "nodes"))
                node_member.update(ask_members(grid, unknown, hints, config.secagg_timeout, reporter.note))
            member_node: dict[str, int] = {}
            for node in nodes:
                member = node_member.get(node)
                if member is not None and member in member_node:
                    reporter.note(f"round {rnd}: nodes {member_node[member]} and {node} both say they are {member}; {node} sits out")
                elif member is not None:
                    member_node[member] = node
            members = _members_of_round(sorted(member_node), config, rnd)
            groups = plan_groups(members, config.contribution_min_group, seed=config.seed, rnd=rnd, min_members=config.min_members)
            planned = {member_node[m]: m for group in groups for m in group}
            node_groups = [[member_node[m] for m in group] for group in groups]
            nodes = sorted(planned)
        else:
            nodes = _members_of_round(nodes, config, rnd)
            node_groups = [nodes]
        reporter.round_started(rnd, len(nodes))

        codec, codec_seed = config.codec_config(), config.seed * 1_000_003 + rnd
        # Broadcast: the round's view of the global state; a member that holds the previous
        # view gets only the int8 patch to it, any other member the full view.
        previous_digest = view_digest(view) if view is not None else ""
        view, patch = advance(view if config.broadcast == "delta" else None, state)
        digest = view_digest(view)
        full_payload = tensors_to_bytes(view)
        patch_payload = tensors_to_bytes(patch) if patch is not None else b""
        messages, bytes_down = [], {}
        for node in nodes:
            if patch is not None and held_views.get(node_member.get(node, "")) == previous_digest:
                kind, base_digest, payload = "patch", previous_digest, patch_payload
            else:
                kind, base_digest, payload = "full", "", full_payload
            ins = TrainInstruction(
                round=rnd, run=run_name, state=payload, state_kind=kind, base_view_sha256=base_digest, view_sha256=digest,
                base_sha256=base.sha256, base_path=str(ws.base),
                members_dir=str(ws.members_dir), nodes_dir=str(ws.root / "nodes"),
                local_steps=config.local_steps, batch_size=config.batch_size, seq_len=config.seq_len,
                lr=config.lr, seed=config.seed, min_expert_tokens=config.min_expert_tokens,
                codec=str(codec), codec_clip=config.codec_clip, codec_seed=codec_seed,
                precision=config.precision, secure=secure,
            )
            content = ins.to_record()
            bytes_down[node] = recorddict_to_proto(content).ByteSize()  # what goes on the wire
            messages.append(Message(content=content, message_type=TRAIN, dst_node_id=node, group_id=str(rnd)))
        replies = exchange(grid, messages, config.round_timeout, lambda n: reporter.member_done(rnd, n, len(nodes)))

        updates: list[Update] = []
        reports: list[MemberReport] = []
        rejected: dict[str, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                held_views.pop(node_member.get(node, ""), None)  # resend the full state next time
                rejected[f"node {node}"] = reply.error.reason
                reporter.note(f"round {rnd}: {reply.error.reason}")
                node_member.pop(node, None)  # ask it again next round
                continue
            try:
                parsed = TrainReply.from_record(reply.content)
                if parsed.round != rnd:
                    raise UpdateRejected(f"member {parsed.member!r}: reply for round {parsed.round}, expected {rnd}")
                if planned and planned.get(node) != parsed.member:
                    raise UpdateRejected(
                        f"node {node} said it is {planned.get(node)!r} but replied as {parsed.member!r}; its group was planned for the former"
                    )
                if secure:
                    if parsed.update:
                        raise UpdateRejected(f"member {parsed.member!r}: sent its update in the clear under secure aggregation")
                    if parsed.expert_tokens:  # they would tell the operator which experts the member's data uses
                        raise UpdateRejected(f"member {parsed.member!r}: sent per-expert token counts in the clear under secure aggregation")
                    check_counts(parsed, config)
                    identities.pin(parsed.member, parsed.identity)
                else:
                    updates.append(validate_update(parsed, shapes, config, codec_seed=codec_seed))
            except (ProtocolError, UpdateRejected, ValueError) as exc:
                rejected[f"node {node}"] = str(exc)
                reporter.note(f"round {rnd}: rejected: {exc}")
                node_member.pop(node, None)
                continue
            node_member[node] = parsed.member
            held_views[parsed.member] = parsed.view_sha256
            reports.append(MemberReport(
                member=parsed.member, node_id=node, bytes_down=bytes_down[node],
                bytes_up=recorddict_to_proto(reply.content).ByteSize(),
                num_tokens=parsed.num_tokens, train_loss=parsed.train_loss, seconds=parsed.seconds,
                experts_sent=len(parsed.expert_tokens), precision=parsed.precision,
            ))
        missing = len(nodes) - len(replies)
        if missing:
            reporter.note(f"round {rnd}: {missing} member(s) did not reply within {config.round_timeout:.0f}s")

        group_sums = {}
        if secure:  # four more exchanges; the operator learns only each group's sum
            reported = {r.member: r.node_id for r in reports}
            outcome = secure_aggregate(
                grid, rnd=rnd, run=run_name,
                groups=[g for g in ({node_member[n]: n for n in group if reported.get(node_member.get(n, "")) == n} for group in node_groups) if g],
                directory=identities.directory(),
                layout=SecureLayout(shapes, {n: expert_of(n) or TOKENS for n in shapes}, codec, codec_seed,
                                    config.local_steps * config.batch_size * config.seq_len),
                settings=SecureSettings(
                    threshold=config.secagg_threshold, neighbours=config.secagg_neighbours, ring_bits=config.secagg_ring_bits,
                    min_group=config.contribution_min_group if config.contribution_mode == "secure" else 0,
                    timeout=config.secagg_timeout, seed=config.seed, min_members=config.min_members,
                ),
                hints={"base_path": str(ws.base), "members_dir": str(ws.members_dir), "nodes_dir": str(ws.root / "nodes")},
                note=reporter.note,
            )
            for member, why in sorted(outcome.dropped.items()):
                rejected[member] = f"secure aggregation: {why}"
                reporter.note(f"round {rnd}: {member} dropped out of secure aggregation at {why}")
            for owner, secret in sorted(outcome.tampered.items()):
                reporter.note(f"round {rnd}: tampered shares of {owner}'s {secret} were revealed at unmask; rebuilt from the others")
            for member, why in sorted(outcome.flagged.items()):
                reporter.note(f"round {rnd}: {member} misbehaved in secure aggregation (its input is still summed): {why}")
            for group, why in sorted(outcome.aborted.items()):
                reporter.note(f"round {rnd}: secure aggregation of group {group} aborted: {why}")
            reports = [
                replace(r, bytes_up=r.bytes_up + outcome.bytes_up.get(r.member, 0),
                        bytes_down=r.bytes_down + outcome.bytes_down.get(r.member, 0),
                        secagg_seconds=outcome.member_seconds.get(r.member, 0.0))
                for r in reports if r.member in outcome.survivors
            ]
            group_sums = outcome.sums
        valid = len(reports) if secure else len(updates)
        if valid < config.min_members:
            reason = f"round {rnd} aborted: {valid} valid update(s), min-members is {config.min_members}; state stays at round {rnd - 1}"
            reporter.note(reason)
            raise RoundAborted(reason)

        # Contribution: each member's effect on held-out loss, never what it claims.
        scores, how, shares = {}, {}, {}
        if config.contribution_mode == "secure" and group_sums:
            scored = score_groups(
                group_sums,
                lambda combine: CoalitionValue(lora, state, combine, contribution_sets, config.batch_size, precision),
                seed=config.seed * 100_003 + rnd,
            )
            values = {frozenset(key.split("+")): v for key, v in scored.group_values.items()}
            estimator = estimator.observe(values)
            estimate = estimator.estimate()
            scores = {r.member: estimate.get(r.member, 0.0) for r in reports}
            errors = estimator.standard_errors()
            credited = sorted(m for m, v in estimator.credited().items() if v > 0)
            how = {"mode": "secure", "evaluations": scored.evaluations,
                   "groups": [{"members": sorted(g), "value": v} for g, v in sorted(values.items(), key=lambda gv: sorted(gv[0]))],
                   "standard_errors": {m: e if math.isfinite(e) else None for m, e in errors.items()},
                   "credited": credited}
            if not credited:
                reporter.note(
                    f"round {rnd}: no member's contribution is distinguishable from zero yet "
                    f"({len(estimator.observations)} group sum(s) for {len(errors)} members and the drift); shares stay 0 until one is"
                )
        elif config.contribution_mode == "open":
            value = open_value(lora, state, updates, contribution_sets, config.batch_size, precision)
            scored = score_open(updates, value, seed=config.seed * 100_003 + rnd,
                                max_permutations=config.contribution_permutations)
            scores = scored.scores
            book = book.add(rnd, scores)
            how = {"mode": "open", "evaluations": scored.evaluations, "null_members": scored.null_members,
                   "duplicates": [list(p) for p in scored.duplicates]}

        shares = contribution_shares(estimator.totals()) if config.contribution_mode == "secure" else book.shares()
        mean_delta = combine_group_sums(list(group_sums.values())) if secure else aggregate(updates, expert_of)
        state = {name: value + mean_delta[name] if name in mean_delta else value for name, value in state.items()}
        lora.set_state(state)
        summary = RoundSummary(
            round=rnd, val_loss=evaluate(lora, val_sets, config), members=sorted(reports, key=lambda r: r.member),
            rejected=rejected, seconds=time.perf_counter() - started,
            scores=scores, shares=shares, contribution=how,
        )
        checkpoints.commit(rnd, state, _manifest(summary, base, config), view=view)
        record_in_ledger(ledger, checkpoints, config)  # after the commit: a crash between re-syncs
        reporter.round_finished(summary)
        summaries.append(summary)
    return summaries


def record_in_ledger(ledger: Ledger, checkpoints: Checkpoints, config: RunConfig) -> None:
    """Append every committed round the ledger lacks, rebuilt from its manifest (idempotent)."""
    last = ledger.latest_round() or 0
    budget = config.local_steps * config.batch_size * config.seq_len
    for manifest in checkpoints.manifests():
        if manifest["round"] <= last or not manifest["members"]:
            continue
        ledger.append_round([
            Record(
                round=manifest["round"], member=m["member"],
                score=float(manifest.get("scores", {}).get(m["member"], 0.0)),
                share=float(manifest.get("shares", {}).get(m["member"], 0.0)),
                tokens=min(int(m["num_tokens"]), budget),  # self-reported: informational only
                bytes_up=int(m["bytes_up"]), bytes_down=int(m["bytes_down"]), dp_epsilon=None,
                release_sha256=manifest["state_sha256"], time=manifest["time"],
            )
            for m in manifest["members"]
        ])


def _manifest(summary: RoundSummary, base: Base, config: RunConfig) -> dict[str, object]:
    return {
        "time": utc_now(),
        "base_sha256": base.sha256,
        "val_loss": summary.val_loss,
        "members": [asdict(m) for m in summary.members],
        "rejected": summary.rejected,
        "bytes_up": summary.bytes_up,
        "bytes_down": summary.bytes_down,
        "seconds": summary.seconds,
        "scores": summary.scores,
        "shares": summary.shares,
        "contribution": summary.contribution,
        "run_config": config.as_user_config(),
    }


def committed_state(workspace: Path, run_name: str = "default") -> tuple[int, dict[str, torch.Tensor]] | None:
    committed = Checkpoints(Workspace(workspace).run_dir(run_name)).load()
    return None if committed is None else (committed.round, committed.state)


def domains_of(summaries: Sequence[RoundSummary]) -> list[str]:
    return sorted({d for s in summaries for d in s.val_loss})
