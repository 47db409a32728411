from __future__ import annotations

import pytest
import torch

from aggregation.fedavg import AggregationError, Update, aggregate
from model.lora import expert_of

SHARED = "model.layers.0.self_attn.q_proj.lora_B"
E0 = "model.layers.0.mlp.experts.down_proj.lora_B.e0"
E1 = "model.layers.0.mlp.experts.down_proj.lora_B.e1"


def test_token_weighted_per_expert_average_matches_hand_computed() -> None:
    a = Update("a", {SHARED: torch.tensor([1.0, 2.0]), E0: torch.tensor([3.0])}, 100, {"0:0": 30})
    b = Update("b", {SHARED: torch.tensor([3.0, 6.0]), E0: torch.tensor([9.0]), E1: torch.tensor([5.0])}, 300, {"0:0": 10, "0:1": 7})
    out = aggregate([a, b], expert_of)
    # shared: (100*[1,2] + 300*[3,6]) / 400
    assert torch.equal(out[SHARED], torch.tensor([2.5, 5.0]))
    # expert 0: (30*3 + 10*9) / 40 = 4.5 -- weighted by routed tokens, not by num_tokens
    assert torch.equal(out[E0], torch.tensor([4.5]))
    # expert 1: only b trained it, so it is b's delta, undiluted by a
    assert torch.equal(out[E1], torch.tensor([5.0]))


def test_zero_weight_members_do_not_count_and_unsent_tensors_are_absent() -> None:
    a = Update("a", {E0: torch.tensor([100.0])}, 50, {"0:0": 0})
    b = Update("b", {E0: torch.tensor([2.0])}, 50, {"0:0": 4})
    out = aggregate([a, b], expert_of)
    assert torch.equal(out[E0], torch.tensor([2.0]))
    assert SHARED not in out and E1 not in out


def test_result_does_not_depend_on_arrival_order() -> None:
    g = torch.Generator().manual_seed(0)
    ups = [Update(f"m{i}", {SHARED: torch.randn(64, generator=g)}, 10 + i, {}) for i in range(5)]
    assert torch.equal(aggregate(ups, expert_of)[SHARED], aggregate(ups[::-1], expert_of)[SHARED])


def test_ffa_lora_average_of_b_equals_average_of_products() -> None:
    g = torch.Generator().manual_seed(1)
    a_frozen = torch.randn(4, 16, generator=g)  # (r, in), shared by every member
    bs = [torch.randn(8, 4, generator=g) for _ in range(3)]  # (out, r)
    tokens = [10, 20, 70]
    ups = [Update(f"m{i}", {SHARED: b}, t, {}) for i, (b, t) in enumerate(zip(bs, tokens))]
    b_avg = aggregate(ups, expert_of)[SHARED]
    product_avg = sum(t * (b @ a_frozen) for b, t in zip(bs, tokens)) / sum(tokens)
    torch.testing.assert_close(b_avg @ a_frozen, product_avg, rtol=1e-5, atol=1e-5)
    # and the reason A is frozen: averaging both factors is not the average of the products
    as_ = [torch.randn(4, 16, generator=g) for _ in range(3)]
    naive = (sum(bs) / 3) @ (sum(as_) / 3)
    exact = sum(b @ a for b, a in zip(bs, as_)) / 3
    assert not torch.allclose(naive, exact, atol=1e-3)


def test_shape_disagreement_is_refused_naming_member_and_tensor() -> None:
    a = Update("a", {SHARED: torch.zeros(2)}, 1, {})
    b = Update("b", {SHARED: torch.zeros(3)}, 1, {})
    with pytest.raises(AggregationError, match=r"member 'b'.*q_proj.lora_B.*\(3,\).*\(2,\)"):
        aggregate([a, b], expert_of)
