"""The secure-aggregation part of a round, as the round loop runs it: five more exchanges after
TRAIN (server/secure.py), after which the operator holds only each group's decoded sum."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from flwr.serverapp import Grid

from aggregation.secure import TOKENS, SecureLayout
from model.lora import expert_of
from server.sampling import Roster
from server.secure import SecureSettings, Sums, secure_aggregate
from server.validate import Received

if TYPE_CHECKING:
    from server.rounds import Run


def secure_stages(
    grid: Grid, run: Run, roster: Roster, received: Received, rnd: int, codec_seed: int, note: Callable[[str], None]
) -> dict[frozenset[str], Sums]:
    """Five more exchanges (server/secure.py); the operator learns only each group's sum.

    `received` keeps the reports of the members that survived, with their secure-aggregation
    bytes and time added; those that dropped out are among its rejections.
    """
    config = run.round
    reported = {r.member: r.node_id for r in received.reports}
    node_member = run.node_member
    groups = [{node_member[n]: n for n in group if reported.get(node_member.get(n, "")) == n} for group in roster.groups]
    outcome = secure_aggregate(
        grid, rnd=rnd, run=run.name,
        groups=[g for g in groups if g],
        directory=run.identities.directory(),
        layout=SecureLayout(run.shapes, {n: expert_of(n) or TOKENS for n in run.shapes}, config.codec_config(), codec_seed,
                            config.token_budget, noise_variance=run.dp.variance if run.dp else 0.0),
        settings=SecureSettings(
            threshold=config.secagg_threshold, neighbours=config.secagg_neighbours, ring_bits=config.secagg_ring_bits,
            min_group=config.contribution_min_group if config.contribution_mode == "secure" else 0,
            timeout=config.secagg_timeout, seed=config.seed, min_members=config.min_members,
        ),
        hints={"base_path": str(run.ws.base), "members_dir": str(run.ws.members_dir), "nodes_dir": str(run.ws.root / "nodes")},
        note=note,
    )
    for member, why in sorted(outcome.dropped.items()):
        received.rejected[member] = f"secure aggregation: {why}"
        note(f"round {rnd}: {member} dropped out of secure aggregation at {why}")
    for owner, secret in sorted(outcome.tampered.items()):
        note(f"round {rnd}: tampered shares of {owner}'s {secret} were revealed at unmask; rebuilt from the others")
    for member, why in sorted(outcome.flagged.items()):
        note(f"round {rnd}: {member} misbehaved in secure aggregation (its input is still summed): {why}")
    for group, why in sorted(outcome.aborted.items()):
        note(f"round {rnd}: secure aggregation of group {group} aborted: {why}")
    received.reports = [
        replace(r, bytes_up=r.bytes_up + outcome.bytes_up.get(r.member, 0),
                bytes_down=r.bytes_down + outcome.bytes_down.get(r.member, 0),
                secagg_seconds=outcome.member_seconds.get(r.member, 0.0))
        for r in received.reports if r.member in outcome.survivors
    ]
    return outcome.sums
