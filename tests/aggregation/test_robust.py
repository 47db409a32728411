"""Poisoning defences of open mode: the norm bound against the round's median, and the
coordinate-wise median / trimmed mean, against hand-computed values and realistic attackers."""

from __future__ import annotations

import math

import pytest
import torch

from aggregation.fedavg import Update, aggregate
from aggregation.robust import bound_norms, robust_aggregate, update_norm
from model.lora import expert_of

SHARED = "model.layers.0.self_attn.q_proj.lora_B.default.weight"  # no expert group: weighted by tokens


def upd(member: str, value: torch.Tensor | float, tokens: int = 100) -> Update:
    tensor = value if isinstance(value, torch.Tensor) else torch.full((2, 3), float(value))
    return Update(member, {SHARED: tensor}, tokens)


def test_an_update_scaled_x10_is_scaled_down_to_the_bound_and_honest_ones_are_untouched() -> None:
    g = torch.Generator().manual_seed(0)
    honest = [upd(f"h{i}", torch.randn(2, 3, generator=g)) for i in range(4)]
    attacker = upd("x", honest[0].delta[SHARED] * 10)
    bounded = bound_norms([*honest, attacker], 3.0)
    norms = sorted(update_norm(u) for u in [*honest, attacker])
    median = norms[2]
    assert bounded.median == pytest.approx(median)
    assert set(bounded.clipped) == {"x"} and bounded.clipped["x"] == pytest.approx(update_norm(attacker) / median)
    out = {u.member: u for u in bounded.updates}
    assert update_norm(out["x"]) == pytest.approx(3.0 * median)
    assert torch.allclose(out["x"].delta[SHARED] / update_norm(out["x"]), attacker.delta[SHARED] / update_norm(attacker))
    assert all(torch.equal(out[h.member].delta[SHARED], h.delta[SHARED]) for h in honest)


def test_the_bound_needs_three_updates_and_can_be_switched_off() -> None:
    two = [upd("a", 1.0), upd("b", 100.0)]
    assert bound_norms(two, 3.0).clipped == {}
    three = [upd("a", 1.0), upd("b", 1.0), upd("c", 100.0)]
    assert bound_norms(three, 0).clipped == {} and set(bound_norms(three, 3.0).clipped) == {"c"}


def test_median_and_trimmed_mean_match_hand_computed_values() -> None:
    odd = [upd("a", 1.0), upd("b", 2.0), upd("c", 100.0)]
    assert torch.equal(robust_aggregate(odd, expert_of, "median")[SHARED], torch.full((2, 3), 2.0))
    even = [*odd, upd("d", 3.0)]
    assert torch.equal(robust_aggregate(even, expert_of, "median")[SHARED], torch.full((2, 3), 2.5))
    five = [*even, upd("e", 4.0)]  # 1 2 3 4 100: drop one at each end -> mean(2, 3, 4)
    assert torch.allclose(robust_aggregate(five, expert_of, "trimmed-mean", trim=0.2)[SHARED], torch.full((2, 3), 3.0))
    # per coordinate, not per member: each coordinate's own outlier is dropped
    mixed = [upd("a", torch.tensor([[0.0, 9.0, 1.0], [1, 1, 1]])), upd("b", torch.tensor([[1.0, 1.0, -9.0], [1, 1, 1]])),
             upd("c", torch.tensor([[2.0, 2.0, 2.0], [1, 1, 1]]))]
    assert torch.equal(robust_aggregate(mixed, expert_of, "median")[SHARED], torch.tensor([[1.0, 2.0, 1.0], [1, 1, 1]]))
    # "mean" is the token-weighted mean of fedavg, unchanged
    weighted = [upd("a", 1.0, tokens=300), upd("b", 5.0, tokens=100)]
    assert torch.equal(robust_aggregate(weighted, expert_of, "mean")[SHARED], aggregate(weighted, expert_of)[SHARED])


def test_an_expert_counts_only_the_members_that_sent_it_with_tokens() -> None:
    name = "model.layers.0.block_sparse_moe.experts.lora_B.e1"  # expert 0:1
    assert expert_of(name) == "0:1"
    sent = [Update("a", {name: torch.full((2,), 1.0)}, 100, {"0:1": 10}),
            Update("b", {name: torch.full((2,), 3.0)}, 100, {"0:1": 10}),
            Update("c", {name: torch.full((2,), 1000.0)}, 100, {"0:1": 0}),  # sent but routed nothing: no say
            Update("d", {}, 100, {})]
    assert torch.equal(robust_aggregate(sent, expert_of, "median")[name], torch.full((2,), 2.0))


@pytest.mark.parametrize("attack", ["sign-flip", "scale-x10", "noise"])
def test_one_attacker_in_five_moves_the_median_far_less_than_the_mean(attack: str) -> None:
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(64, 64, generator=g) * 0.01
    honest = [upd(f"h{i}", truth + torch.randn(64, 64, generator=g) * 0.002) for i in range(4)]
    poison = {"sign-flip": -10 * truth, "scale-x10": 10 * honest[0].delta[SHARED],
              "noise": torch.randn(64, 64, generator=g) * 0.1}[attack]
    updates = [*honest, upd("x", poison)]
    clean = aggregate(honest, expert_of)[SHARED]

    def error(method: str, bound: float = 0.0) -> float:
        kept = bound_norms(updates, bound).updates if bound else updates
        return float((robust_aggregate(kept, expert_of, method)[SHARED] - clean).norm() / clean.norm())

    assert error("median") < 0.25 < error("mean"), (error("median"), error("mean"))
    assert error("trimmed-mean") < 0.25
    assert error("mean", bound=3.0) < error("mean")  # the norm bound alone limits the damage
    assert math.isfinite(error("median"))
