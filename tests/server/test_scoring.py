"""A planted consortium of 5 members with known roles, trained for real on the tiny base."""

from __future__ import annotations

import random

import pytest
import torch

from aggregation.contribution import ScoreBook, contribution_shares
from aggregation.group_estimator import GroupValueEstimator
from aggregation.fedavg import Update
from model.precision import select_precision
from client.trainer import TrainConfig, train_local
from server.config import RunConfig
from model.base import load_base
from model.member_data import read_texts
from model.tokenizer import pack
from server.evaluation import validation_sets
from server.scoring import combine_group_sums, open_value, score_open

ROLES = ("rich", "duplicate", "noisy", "small", "free_rider")


@pytest.fixture(scope="module")
def planted(tiny_workspace):
    base = load_base(tiny_workspace.base)
    lora = base.with_lora()
    state = lora.get_state()
    config = RunConfig(workspace=str(tiny_workspace.root), seq_len=64, batch_size=8, eval_batches=2)
    # a consortium for one domain (code): the operator values updates on its code validation set
    val = {"code": validation_sets(tiny_workspace, base, config)["code"]}
    code = pack(base.tokenizer, read_texts(tiny_workspace.members_dir / "code"), 64)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(code.shape[0], generator=g)
    rich, rest = code[order[: code.shape[0] // 2]], code[order[code.shape[0] // 2 :]]
    shuffled_vocab = torch.randperm(base.tokenizer.vocab_size, generator=g)
    data = {
        "rich": rich,
        "duplicate": rich.clone(),  # a copy of the rich member's data
        "noisy": shuffled_vocab[rest],  # real text with its token ids shuffled: fluent-looking noise
        "small": rest[:16],  # a little real data: one pass over it is two steps
    }
    precision = select_precision("auto", "cpu")
    updates = []
    for seed, (member, member_blocks) in enumerate(data.items()):
        steps = 2 if member == "small" else 6
        result = train_local(lora, state, member_blocks, TrainConfig(steps, 8, 0.001, seed, 16), precision)
        updates.append(Update(member, result.delta, result.num_tokens, result.expert_tokens))
    # the free rider claims the same work and sends nothing
    updates.append(Update("free_rider", {k: torch.zeros_like(v) for k, v in updates[0].delta.items()}, updates[0].num_tokens, dict(updates[0].expert_tokens)))
    return lora, state, updates, val, precision


def test_open_mode_ranks_planted_members_and_free_rider_gets_nothing(planted) -> None:
    lora, state, updates, val, precision = planted
    value = open_value(lora, state, updates, val, 8, precision)
    scores = score_open(updates, value, seed=1)
    shares = ScoreBook().add(1, scores.scores).shares()
    print({m: round(shares[m], 4) for m in ROLES}, "evaluations:", scores.evaluations)
    assert scores.null_members == ["free_rider", "noisy"]  # noisy: what only it sent makes code worse (z < 0)
    assert scores.novelty["noisy"] < 0 < 4.0 < min(scores.novelty[m] for m in ("rich", "duplicate", "small"))
    assert shares["free_rider"] <= 0.02
    assert min(shares["rich"], shares["duplicate"]) > shares["small"] > shares["noisy"]
    assert shares["noisy"] <= 0.05
    assert scores.evaluations < 2 ** len(ROLES)


def test_secure_mode_recovers_the_ranking_from_group_sums_only(planted) -> None:
    lora, state, updates, val, precision = planted
    by_member = {u.member: u for u in updates}
    rng = random.Random(3)
    estimator = GroupValueEstimator(nonnegative=False)  # noisy members are truly negative
    for _ in range(28):
        # each round a random subset of the members takes part, as one secure group of >= 3
        group = frozenset(rng.sample(ROLES, rng.choice([3, 4])))
        # all the server learns: the group's token-weighted sum and its weight sum per tensor
        weighted: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for member in group:
            u = by_member[member]
            for name, delta in u.delta.items():
                weighted[name] = weighted.get(name, torch.zeros_like(delta)) + u.num_tokens * delta
                weights[name] = weights.get(name, 0.0) + u.num_tokens
        # valued as its part of an aggregate over the whole consortium (additive in members)
        consortium = {name: len(ROLES) * by_member["rich"].num_tokens for name in weights}
        mean = combine_group_sums([(weighted, weights)], reference=consortium)
        value = open_value(lora, state, [], val, 8, precision)
        estimator = estimator.observe({group: value.loss({}) - value.loss(mean)})
    shares = contribution_shares(estimator.totals())
    print({m: round(shares[m], 4) for m in ROLES}, estimator.estimate())
    assert shares["free_rider"] <= 0.02
    assert min(shares["rich"], shares["duplicate"]) > max(shares["small"], shares["noisy"], shares["free_rider"])


def test_coalitions_are_valued_on_the_step_the_server_optimizer_takes(planted) -> None:
    from aggregation.server_opt import ServerOptimizer

    lora, state, updates, val, precision = planted
    momentum = ServerOptimizer("fedavgm", lr=2.0, momentum=0.9)  # from fresh state: x + 2 * mean delta
    stepped = open_value(lora, state, updates, val, 8, precision, step=lambda s, d: momentum.step(s, d, {})[0])
    doubled = [Update(u.member, {k: 2 * v for k, v in u.delta.items()}, u.num_tokens, dict(u.expert_tokens)) for u in updates]
    plain = open_value(lora, state, updates, val, 8, precision)
    coalition = frozenset({"rich", "noisy"})
    assert stepped(coalition) == pytest.approx(open_value(lora, state, doubled, val, 8, precision)(coalition), abs=1e-5)
    assert abs(stepped(coalition) - plain(coalition)) > 1e-4


def test_free_riders_beyond_zeros_get_nothing_in_open_mode(planted) -> None:
    """Free riders that try to pass: a replay of the consortium's last change (two views
    apart), copies of the rich member's update with 15% noise (what evaded the cosine test) and
    with noise as large as the update (a cosine of about 0.7, far above any two honest members'),
    pure noise with an honest norm, a tiny non-zero update; each claims the rich member's tokens.
    The original keeps its credit."""
    lora, state, updates, val, precision = planted
    honest = [u for u in updates if u.member in ("rich", "small", "noisy")]
    rich = next(u for u in honest if u.member == "rich")
    g = torch.Generator().manual_seed(7)
    # what the consortium's state moved by last round: an update trained on the rich member's data
    # with another seed (not a combination of this round's updates, which would explain them)
    last_change = {k: v.clone() for k, v in next(u for u in updates if u.member == "duplicate").delta.items()}

    def noise_like(delta, scale):  # noqa: ANN001, ANN202
        return {k: torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 * scale for k, v in delta.items()}

    def claiming(name, delta):  # noqa: ANN001, ANN202
        return Update(name, delta, rich.num_tokens, dict(rich.expert_tokens))

    riders = [
        claiming("replayer", {k: v.clone() for k, v in last_change.items()}),
        claiming("loud_copier", {k: v + n for (k, v), n in zip(rich.delta.items(), noise_like(rich.delta, 1.0).values())}),
        claiming("noise", noise_like(rich.delta, 1.0)),
        claiming("whisper", {k: v * 1e-5 for k, v in noise_like(rich.delta, 1.0).items()}),
    ]
    everyone = honest + riders
    scores = score_open(everyone, open_value(lora, state, everyone, val, 8, precision), seed=2, references={"last": last_change})
    print({m: round(z, 1) for m, z in scores.novelty.items()})
    assert {u.member for u in riders} <= set(scores.null_members)
    assert "rich" not in scores.null_members and scores.novelty["rich"] >= 4.0
    shares = ScoreBook().add(1, scores.scores).shares()
    assert all(shares[u.member] == 0.0 for u in riders)
    assert shares["rich"] > 0.1 and shares["small"] > 0
    # a copy with 15% noise (what evaded the cosine test) is caught too; the closer the copy, the
    # less of its original's update is left unexplained (the documented limit: a nearly exact
    # copy, which only a colluding member can send, takes its original's credit with it)
    close = claiming("copier", {k: v + n for (k, v), n in zip(rich.delta.items(), noise_like(rich.delta, 0.15).values())})
    with_close = score_open([*everyone, close], open_value(lora, state, [*everyone, close], val, 8, precision), seed=2,
                            references={"last": last_change})
    assert "copier" in with_close.null_members and with_close.scores["copier"] == 0.0
    assert with_close.novelty["rich"] < 0.5 * scores.novelty["rich"]
    assert with_close.novelty["small"] == pytest.approx(scores.novelty["small"], rel=0.2)


def test_the_evaluations_head_is_the_base_loss_scoring_would_compute(tiny_workspace) -> None:
    """Scoring starts each round from the committed model's loss on the contribution sets, taken
    from the previous evaluation's first batches instead of evaluating it again: it must be the
    very number CoalitionValue computes, and the full loss must not change by splitting it."""
    from server.evaluation import evaluate, evaluate_with_head
    from server.scoring import CoalitionValue

    base = load_base(tiny_workspace.base)
    lora = base.with_lora()
    config = RunConfig(workspace=str(tiny_workspace.root), seq_len=64, batch_size=4, eval_batches=3, contribution_batches=2)
    sets = validation_sets(tiny_workspace, base, config)
    assert all(blocks.shape[0] > 2 * 4 for blocks in sets.values())  # every set has a rest beyond the head
    head_sets = {d: b[: 2 * 4] for d, b in sets.items()}
    lora.set_state({k: v + 0.01 for k, v in lora.get_state().items()})  # a trained-looking model
    losses, head = evaluate_with_head(lora, sets, config, 2)
    precision = select_precision(config.precision)
    fresh = CoalitionValue(lora, lora.get_state(), lambda s: {}, head_sets, config.batch_size, precision)
    assert head == pytest.approx(fresh.loss({}), rel=1e-12, abs=0)
    whole = evaluate(lora, sets, config)
    assert losses == pytest.approx(whole, rel=1e-9)
    assert evaluate_with_head(lora, sets, config, 0)[1] is None
    preset = CoalitionValue(lora, lora.get_state(), lambda s: {}, head_sets, config.batch_size, precision, _base=head)
    assert preset(frozenset({"a"})) == pytest.approx(0.0, abs=1e-12) and preset.evaluations == 1  # base not re-evaluated


def test_group_sum_is_what_secure_aggregation_gives_the_server() -> None:
    """Weighted by tokens (routed tokens for an expert tensor), summed per tensor; a member that
    did not route to an expert adds neither delta nor weight there."""
    from model.lora import expert_of
    from server.scoring import group_sum

    shared, expert = "layers.0.attn.q.lora_B", "layers.1.mlp.experts.lora_B.e3"
    assert expert_of(shared) is None and expert_of(expert) == "1:3"
    a = Update("a", {shared: torch.tensor([1.0, 2.0]), expert: torch.tensor([4.0])}, 10, {"1:3": 5})
    b = Update("b", {shared: torch.tensor([-1.0, 0.5]), expert: torch.tensor([8.0])}, 30, {})
    sums, weights = group_sum([a, b])
    assert torch.equal(sums[shared], torch.tensor([10.0 - 30.0, 20.0 + 15.0])) and weights[shared] == 40.0
    assert torch.equal(sums[expert], torch.tensor([20.0])) and weights[expert] == 5.0


def test_under_server_momentum_a_member_sending_zeros_is_worth_exactly_nothing(planted) -> None:
    """With a server optimizer that has momentum, the round moves the model even if everybody
    sends zeros. Coalitions are valued against that round, not against the unchanged model:
    otherwise every coalition carries the momentum's value (and a zero update is worth it)."""
    from aggregation.server_opt import ServerOptimizer
    from server.scoring import CoalitionValue

    lora, state, updates, val, precision = planted
    rich = next(u for u in updates if u.member == "rich")
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    _, opt_state = opt.step(state, rich.delta, {})  # last round's momentum: the rich member's update

    def step(x, d):  # noqa: ANN001, ANN202
        return opt.step(x, d, opt_state)[0]

    value = open_value(lora, state, updates, val, 8, precision, step)
    assert value(frozenset({"free_rider"})) == 0.0  # exactly: the same model as the base
    assert value(frozenset({"free_rider", "rich"})) == value(frozenset({"rich"}))
    against_unchanged = CoalitionValue(lora, state, value.combine, val, 8, precision, step)  # moved: none
    assert abs(against_unchanged(frozenset({"free_rider"}))) > 1e-4  # the momentum's value, credited to zeros


def test_secure_scoring_takes_all_groups_value_from_the_rounds_evaluation(planted) -> None:
    """Secure rounds are scored after the round's step and evaluation: the committed model's head
    loss is the loss of all groups together, so scoring skips that evaluation. The group values
    must be exactly those of scoring that evaluates it, with one evaluation fewer."""
    from aggregation.server_opt import ServerOptimizer
    from server.evaluation import evaluate_with_head
    from server.scoring import CoalitionValue, group_sum, score_groups

    lora, state, updates, val, precision = planted
    by_name = {u.member: u for u in updates}
    groups = {frozenset(g): group_sum([by_name[m] for m in g]) for g in (("rich", "noisy"), ("duplicate", "small", "free_rider"))}
    opt = ServerOptimizer("fedyogi", lr=0.03, warmup=3)
    _, opt_state = opt.step(state, updates[0].delta, {})  # some history, so a zero step moves too
    committed, _ = opt.step(state, combine_group_sums(list(groups.values())), opt_state)
    config = RunConfig(workspace="unused", seq_len=64, batch_size=8, eval_batches=2, contribution_batches=1)
    lora.set_state(committed)
    _, head = evaluate_with_head(lora, val, config, config.contribution_batches)
    head_sets = {d: b[:8] for d, b in val.items()}

    def step(x, d):  # noqa: ANN001, ANN202
        return opt.step(x, d, opt_state)[0]

    def scored(known):  # noqa: ANN001, ANN202
        return score_groups(groups, lambda combine: CoalitionValue(lora, state, combine, head_sets, 8, precision, step, known=known), seed=3)

    fresh = scored({})
    reused = scored({frozenset(by_name): head})
    assert reused.group_values == fresh.group_values  # exactly: the same model, the same batches
    assert reused.evaluations == fresh.evaluations - 1 == 3  # the zero round and each group alone
    wrong = scored({frozenset(by_name): head + 0.5})  # the known loss is used, not recomputed
    assert sum(wrong.group_values.values()) == pytest.approx(sum(fresh.group_values.values()) - 0.5, abs=1e-9)
