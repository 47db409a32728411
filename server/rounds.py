"""The operator's round loop. `run_round` reads top to bottom as the round's stages:

    sample -> broadcast -> train (TRAIN exchange) -> validate -> secure stages (secagg on)
           -> enough? -> score -> aggregate -> evaluate -> commit -> ledger

each a named function here or in the module that holds its idea (server/sampling.py,
server/validate.py, server/secure.py, server/scoring.py, server/evaluation.py). Secure
contribution scores after the evaluation instead: it rejects nobody, and the evaluated model's
head loss is the value of all groups together. It talks to Flower only through the `Grid` it is
given, so the same loop runs in Flower's simulation engine and in a real SuperLink deployment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from flwr.serverapp import Grid

from aggregation.contribution import ContributionError, ScoreBook, contribution_shares
from aggregation.fedavg import Update
from aggregation.group_estimator import GroupValueEstimator
from aggregation.schedule import update_drift
from aggregation.server_opt import ServerOptimizer, check_state
from model.base import Base, load_base
from model.lora import LoraMoE, expert_of
from model.precision import Precision, select_precision
from server.checkpoint import Checkpoints, hold_run
from server.config import RunConfig, changed_server_settings
from server.balance import observe_expert_load
from server.broadcast import broadcast, round_view
from server.evaluation import evaluate, evaluate_with_head, validation_sets
from server.grid import exchange
from server.history import PublicHistory
from server.identities import Identities
from server.ledger import Ledger, OperatorKey, utc_now
from server.sampling import plan_round, sample_members
from server.binding import UNBOUND_WARNING, MemberBinding
from server.ledger_sync import record_in_ledger
from server.member_dp import MemberDP, member_dp
from server.rights import Policy, load_policy, past_probation
from aggregation.robust import robust_aggregate
from server.scoring import CoalitionValue, RoundScores, combine_group_sums, open_value, score_groups, score_open
from server.faults import kill_point
from server.journal import Journal, state_digest
from server.secure import Sums
from server.secure_stages import secure_stages
from server.summary import Laps, Reporter, RoundSummary
from server.validate import Received, reject_members, validate_replies
from server.workspace import Workspace


class RoundAborted(RuntimeError):
    """Too few valid updates: nothing is committed, the global state stays as it was."""


class TooFewMembers(RoundAborted):
    """Fewer valid updates than min-members: retried (round-retries) before the run gives up."""


SLEEP = time.sleep  # the retry backoff's wait (tests replace it)


@dataclass
class Run:
    """The operator's state across the rounds of one run: what a restart rebuilds from disk."""

    config: RunConfig  # the run's
    round: RunConfig  # this round's: local steps and members per round as the schedule set them
    name: str
    ws: Workspace
    base: Base
    lora: LoraMoE
    shapes: dict[str, tuple[int, ...]]
    val_sets: dict[str, torch.Tensor]
    contribution_sets: dict[str, torch.Tensor]  # the first contribution-batches of each validation set
    precision: Precision
    checkpoints: Checkpoints
    ledger: Ledger
    identities: Identities
    state: dict[str, torch.Tensor]  # the global trainable state, as last committed
    view: dict[str, torch.Tensor] | None  # delta broadcast: the view members trained from last round
    optimizer: ServerOptimizer  # the server's step on the aggregated update
    opt_state: dict[str, torch.Tensor]  # its per-tensor state, committed with each round
    expert_load: torch.Tensor | None  # (L, E) the consortium's routed-token fractions last round
    load_weight: float  # a member's part of the consortium's tokens last round (1 / members)
    book: ScoreBook  # open contribution: per-round scores
    estimator: GroupValueEstimator  # secure contribution: group values -> member values
    first: int  # the first round still to run
    resumed: bool
    held_views: dict[str, str] = field(default_factory=dict)  # member -> digest of the view it holds
    node_member: dict[int, str] = field(default_factory=dict)
    binding: MemberBinding = field(default_factory=MemberBinding.from_env)  # names bound to their nodes
    history: PublicHistory | None = None  # open contribution: past changes a free rider could replay
    last_step: dict[str, torch.Tensor] | None = None  # the mean update that moved the state since the broadcast
    step_base: str = ""  # "step" broadcast: digest of the step view sent last
    policy: Policy = field(default_factory=Policy)  # the workspace's usage-rights policy (probation)
    sitting_out: set[str] = field(default_factory=set)  # members past their probation
    contribution_base: float | None = None  # the committed model's loss on contribution_sets, if known
    dp: MemberDP | None = None  # member-level DP: the noise every unmasked sum carries (server/member_dp.py)


def run_rounds(grid: Grid, config: RunConfig, reporter: Reporter, *, run_name: str = "default") -> list[RoundSummary]:
    """Run (or resume) the configured rounds; each committed round is in the ledger."""
    with hold_run(Workspace(config.workspace_path).run_dir(run_name)):  # one process per run
        run = open_run(config, run_name)
        reporter.start(run.first, config.num_rounds, resumed=run.resumed)
        if run.binding.warn:
            reporter.note(UNBOUND_WARNING)
        summaries = []
        for rnd in range(run.first, config.num_rounds + 1):
            for retry in range(config.round_retries + 1):
                try:
                    summaries.append(run_round(grid, run, rnd, reporter))
                    break
                except TooFewMembers as exc:
                    if retry == config.round_retries:
                        raise
                    wait = config.round_retry_backoff * 2**retry
                    reporter.note(f"round {rnd}: retry {retry + 1} of {config.round_retries} in {wait:g}s ({exc})")
                    SLEEP(wait)
                    run = open_run(config, run_name)  # as a restart would: the round runs again from the committed state
        return summaries


def run_round(grid: Grid, run: Run, rnd: int, reporter: Reporter) -> RoundSummary:
    started, laps = time.perf_counter(), Laps()
    run.round, decision = plan_round(run.config, run.checkpoints.manifests, rnd, reporter.note)
    config = run.round
    codec_seed = config.seed * 1_000_003 + rnd  # the round's shared seed (randk coordinates)
    journal, from_state = Journal(run.checkpoints.run_dir), state_digest(run.state)
    journaled = journal.read(rnd, from_state) if config.secagg == "on" else None
    if journaled is not None:  # unmasked before a restart: never asked of the members again
        reporter.note(f"round {rnd}: finished from its journal (its group sums were unmasked before a restart)")
        received, group_sums, drift = journaled.received, journaled.group_sums, None
        reporter.round_started(rnd, len(received.reports))
        round_view(run)  # the view the members trained from, as the round's broadcast set it
    else:
        received, group_sums, drift = gather(grid, run, rnd, codec_seed, reporter, laps)
        kill_point("after-unmask")
        require_enough(received, config, rnd, reporter.note)  # an aborted round is never journaled
        if group_sums:
            journal.write(rnd, from_state, received, group_sums)
        kill_point("after-journal")
    # secure scoring rejects nobody, so it waits for the evaluation: the committed model's head
    # loss is the value of all groups together, one coalition evaluation fewer
    score_late = config.contribution_mode == "secure" and bool(group_sums)
    if not score_late:
        scores, how, shares = score_round(run, received, group_sums, rnd, reporter.note)
    laps("score")
    previous = run.state, run.opt_state, run.contribution_base
    run.state, run.opt_state, step = aggregate_round(run, received, group_sums)
    run.lora.set_state(run.state)
    if run.history is not None:
        run.history.record(rnd, previous[0], run.state)
    load, weight, specialization = observe_expert_load(run.lora, config.secagg == "on", received, group_sums)
    if load is not None:
        run.expert_load, run.load_weight = load, weight
    laps("aggregate")
    val_loss, run.contribution_base = evaluate_with_head(run.lora, run.val_sets, config, config.contribution_batches)
    laps("evaluate")
    if not all(math.isfinite(v) for v in val_loss.values()):  # a poisoned aggregate: never committed
        run.state, run.opt_state, run.contribution_base = previous
        run.lora.set_state(run.state)
        bad = sorted(d for d, v in val_loss.items() if not math.isfinite(v))
        raise RoundAborted(f"round {rnd} aborted: its aggregate makes validation loss non-finite on {', '.join(bad)}; "
                           f"state stays at round {rnd - 1}")
    if score_late:
        scores, how, shares = score_round(run, received, group_sums, rnd, reporter.note, start=previous)
        run.lora.set_state(run.state)
        run.lora.model.to("cpu")  # scoring left it on the device; the evaluation used to move it back
        laps("score")
    summary = RoundSummary(
        round=rnd, val_loss=val_loss, members=sorted(received.reports, key=lambda r: r.member),
        rejected=received.rejected, seconds=time.perf_counter() - started,
        scores=scores, shares=shares, contribution=how, timing=laps.seconds, specialization=specialization,
        dp_member_epsilon=run.dp.spent(rnd) if run.dp else None,
    )
    load_list = run.expert_load.tolist() if run.expert_load is not None else None  # a resume sends it again
    manifest = {**_manifest(summary, run.base, config), "expert_load": load_list,
                "load_weight": run.load_weight, "drift": drift, "schedule": decision}
    view = run.view if config.broadcast == "delta" else None  # only a patch chain resumes from it
    run.checkpoints.commit(rnd, run.state, manifest, view=view, optimizer=run.opt_state)
    journal.clear(rnd)
    kill_point("after-commit")
    run.last_step = step if config.broadcast == "step" else None  # what moved the state members hold
    record_in_ledger(run.ledger, run.checkpoints, config)  # after the commit: a crash between re-syncs
    reporter.round_finished(summary)
    return summary


def gather(
    grid: Grid, run: Run, rnd: int, codec_seed: int, reporter: Reporter, laps: Laps
) -> tuple[Received, dict[frozenset[str], Sums], float | None]:
    """Sample, send TRAIN, validate the replies, and under secure aggregation unmask the group sums."""
    config = run.round
    sitting_out = past_probation(run.policy, run.ledger.records(), secure=config.contribution_mode == "secure")
    for member in sorted(sitting_out - run.sitting_out):
        reporter.note(f"round {rnd}: member {member!r} stays under min_share after its probation: no longer sampled")
    run.sitting_out = sitting_out
    roster = sample_members(grid, config, run.ws, run.node_member, rnd, reporter.note, run.binding, sitting_out)
    reporter.round_started(rnd, len(roster.nodes))
    laps("sample")
    messages, bytes_down = broadcast(run, roster, rnd, codec_seed)
    laps("broadcast")
    replies = exchange(grid, messages, config.round_timeout, lambda n: reporter.member_done(rnd, n, len(roster.nodes)))
    laps("train")  # until the last reply: the members' training and the transport both ways
    received = validate_replies(
        replies, roster, rnd=rnd, config=config, shapes=run.shapes, codec_seed=codec_seed, bytes_down=bytes_down,
        identities=run.identities, node_member=run.node_member, held_views=run.held_views, note=reporter.note,
        binding=run.binding,
    )
    adaptive_open = config.schedule == "adaptive" and config.secagg == "off"
    drift = update_drift([u.delta for u in received.updates]) if adaptive_open else None  # what the schedule reads
    laps("validate")
    kill_point("after-train")
    group_sums = secure_stages(grid, run, roster, received, rnd, codec_seed, reporter.note) if config.secagg == "on" else {}
    laps("secure")
    return received, group_sums, drift


def open_run(config: RunConfig, run_name: str) -> Run:
    """Load the base and validation sets; resume the committed state, or commit round 0."""
    ws = Workspace(config.workspace_path)
    base = load_base(ws.base)
    lora = base.with_lora()
    shapes = lora.shapes()
    val_sets = validation_sets(ws, base, config)
    precision = select_precision(config.precision)  # refused before anything is written
    identities = Identities(ws.operator_dir / "identities.json")
    checkpoints = Checkpoints(ws.run_dir(run_name))
    ledger = Ledger(ws.ledger(run_name), OperatorKey.load_or_create(ws.operator_key))
    # Secure contribution: unconstrained least squares. A harmful member is truly negative, and
    # forcing it to 0 would push its group-mates' values around; negative totals are clipped to 0
    # only when they become shares.
    book, estimator = ScoreBook(), GroupValueEstimator(nonnegative=False)
    committed = checkpoints.load()
    view: dict[str, torch.Tensor] | None = None
    opt_state: dict[str, torch.Tensor] = {}
    expert_load, load_weight = None, 1.0
    if committed is None:
        state = lora.get_state()
        summary = RoundSummary(round=0, val_loss=evaluate(lora, val_sets, config))
        checkpoints.commit(0, state, _manifest(summary, base, config))
        first = 1
    else:
        if set(committed.state) != set(shapes):
            raise RuntimeError(f"{checkpoints.run_dir}: committed state does not match the base's trainable state")
        state, view, opt_state = committed.state, committed.view, committed.optimizer
        was, now = committed.manifest.get("run_config", {}), config.as_user_config()
        changed = changed_server_settings(was, now)
        if opt_state and changed:
            key, before, after = changed[0]
            raise RuntimeError(
                f"{checkpoints.run_dir}: committed with {key} {before!r}, resumed with "
                f"{after!r}; resume with the same server optimizer settings or start a new run"
            )
        check_state(opt_state, shapes, str(checkpoints.round_dir(committed.round)))
        if committed.manifest.get("expert_load"):
            expert_load = torch.tensor(committed.manifest["expert_load"], dtype=torch.float32)
            load_weight = float(committed.manifest.get("load_weight", 1.0))
        record_in_ledger(ledger, checkpoints, config)  # rounds committed before a crash
        for manifest in checkpoints.manifests()[1:]:  # the score book is rebuilt from committed rounds
            how = manifest.get("contribution", {})
            if how.get("mode") == "secure":
                estimator = estimator.observe({frozenset(g["members"]): g["value"] for g in how["groups"]})
            else:
                book = book.add(manifest["round"], manifest.get("scores", {}))
        first = committed.round + 1
    history = None
    if config.contribution_mode == "open":  # secure mode never sees an update to compare
        history = (PublicHistory(config.replay_window, state) if committed is None
                   else PublicHistory.from_checkpoints(checkpoints, committed.round, config.replay_window))
    return Run(
        config=config, round=config, name=run_name, ws=ws, base=base, lora=lora, shapes=shapes, val_sets=val_sets,
        contribution_sets={d: blocks[: config.contribution_batches * config.batch_size] for d, blocks in val_sets.items()},
        precision=precision, checkpoints=checkpoints, ledger=ledger, identities=identities, state=state, view=view,
        optimizer=config.server_optimizer(), opt_state=opt_state,
        expert_load=expert_load, load_weight=load_weight, book=book, estimator=estimator, first=first, resumed=committed is not None,
        policy=load_policy(ws.policy) if ws.policy.is_file() else Policy(),  # a bad policy stops the run here
        history=history, dp=member_dp(config, shapes),
    )


def require_enough(received: Received, config: RunConfig, rnd: int, note: Callable[[str], None]) -> None:
    """Fewer valid updates than min-members: the round aborts and nothing is committed."""
    valid = len(received.reports) if config.secagg == "on" else len(received.updates)
    if valid < config.min_members:
        reason = f"round {rnd} aborted: {valid} valid update(s), min-members is {config.min_members}; state stays at round {rnd - 1}"
        note(reason)
        raise TooFewMembers(reason)


def score_round(
    run: Run, received: Received, group_sums: dict[frozenset[str], Sums], rnd: int, note: Callable[[str], None],
    start: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float | None] | None = None,
) -> tuple[dict[str, float], dict[str, object], dict[str, float]]:
    """(this round's scores, how they were computed, cumulative shares).

    Contribution is each member's effect on held-out loss, never what it claims. `start`: the
    round's starting (state, optimizer state, head loss) when scoring follows the round's step
    and evaluation (secure mode); `run.contribution_base` is then the committed model's head loss.
    """
    config = run.config
    scores: dict[str, float] = {}
    how: dict[str, object] = {}
    state, opt_state, start_head = start if start is not None else (run.state, run.opt_state, run.contribution_base)

    def step(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Coalitions are valued on the model the round's own optimizer step would give them."""
        return run.optimizer.step(state, delta, opt_state)[0]

    base = start_head if run.optimizer.name == "fedavg" else None  # else a zero step still moves

    if config.contribution_mode == "secure" and group_sums:
        everybody = frozenset().union(*group_sums)
        known = {everybody: run.contribution_base} if start is not None and run.contribution_base is not None else {}
        scored = score_groups(
            group_sums,
            lambda combine: CoalitionValue(run.lora, state, combine, run.contribution_sets, config.batch_size,
                                           run.precision, step, _base=base, known=known),
            seed=config.seed * 100_003 + rnd,
        )
        values = {frozenset(key.split("+")): v for key, v in scored.group_values.items()}
        run.estimator = run.estimator.observe(values)
        estimate = run.estimator.estimate()
        scores = {r.member: estimate.get(r.member, 0.0) for r in received.reports}
        errors = run.estimator.standard_errors()
        credited = sorted(m for m, v in run.estimator.credited().items() if v > 0)
        how = {"mode": "secure", "evaluations": scored.evaluations,
               "groups": [{"members": sorted(g), "value": v} for g, v in sorted(values.items(), key=lambda gv: sorted(gv[0]))],
               "standard_errors": {m: e if math.isfinite(e) else None for m, e in errors.items()},
               "credited": credited}
        if not credited:
            note(
                f"round {rnd}: no member's contribution is distinguishable from zero yet "
                f"({len(run.estimator.observations)} group sum(s) for {len(errors)} members and the drift); shares stay 0 until one is"
            )
    elif config.contribution_mode == "open":
        def value_of(updates: list[Update]) -> CoalitionValue:
            return open_value(run.lora, state, updates, run.contribution_sets, config.batch_size, run.precision, step, base=base)

        def scored() -> RoundScores:
            return score_open(received.updates, value_of(received.updates), seed=config.seed * 100_003 + rnd,
                              max_permutations=config.contribution_permutations,
                              references=run.history.references() if run.history is not None else None)

        try:
            scored_open = scored()
        except ContributionError:  # some update makes validation loss non-finite: find and reject it
            value = value_of(received.updates)
            reject_members(received, {u.member for u in received.updates if not math.isfinite(value(frozenset({u.member})))},
                           "its update makes validation loss non-finite", rnd, note)
            scored_open = scored()
        scores = scored_open.scores
        run.book = run.book.add(rnd, scores)
        how = {"mode": "open", "evaluations": scored_open.evaluations, "null_members": scored_open.null_members,
               "duplicates": [list(p) for p in scored_open.duplicates],
               "novel_descent_z": {m: round(z, 2) for m, z in scored_open.novelty.items()}}
    shares = contribution_shares(run.estimator.totals()) if config.contribution_mode == "secure" else run.book.shares()
    return scores, how, shares


def aggregate_round(
    run: Run, received: Received, group_sums: dict[frozenset[str], Sums]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new global state, new optimizer state, the mean update): the server optimizer's step on
    the token-weighted mean update, per expert; tensors nobody trained keep their value and state."""
    if run.config.secagg == "on":
        mean_delta = combine_group_sums(list(group_sums.values()))
    else:
        mean_delta = robust_aggregate(received.updates, expert_of, run.config.aggregator, run.config.aggregator_trim)
    return (*run.optimizer.step(run.state, mean_delta, run.opt_state), mean_delta)


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
        "specialization": summary.specialization,
        "timing": summary.timing,  # the commit and the ledger append after it are not in it
        "dp_member_epsilon": summary.dp_member_epsilon,  # member-level DP: the consortium's ε so far (None: off)
        "members_train_seconds": sum(m.seconds for m in summary.members),
        "run_config": config.as_user_config(),
    }
