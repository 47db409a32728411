"""Specialization metrics on planted routing, computed exactly."""

from __future__ import annotations

import math

import pytest
import torch

from aggregation.specialization import consortium_load, routing_entropy, top_member_share


def test_consortium_load_is_per_layer_fractions_and_uniform_where_nobody_routed() -> None:
    load = consortium_load({"0:0": 30, "0:1": 10, "1:3": 5}, layers=3, experts=4)
    assert torch.equal(load[0], torch.tensor([0.75, 0.25, 0.0, 0.0]))
    assert torch.equal(load[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(load[2], torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="outside 3 layers x 4 experts"):
        consortium_load({"3:0": 1}, layers=3, experts=4)


def test_top_member_share_on_planted_routing() -> None:
    # layer 0: expert 0 is a's (90 of 100), expert 1 is split 50/50, experts 2-3 unused
    by_member = {"a": {"0:0": 90, "0:1": 50}, "b": {"0:0": 10, "0:1": 50}}
    assert top_member_share(by_member, layers=1, experts=4) == pytest.approx((0.9 + 0.5) / 2)
    owned = {"a": {"0:0": 7}, "b": {"0:1": 3}, "c": {"0:2": 1, "0:3": 1}}
    assert top_member_share(owned, layers=1, experts=4) == 1.0
    assert top_member_share({}, layers=1, experts=4) is None


def test_routing_entropy_is_normalized_and_averaged_over_layers() -> None:
    uniform_then_single = {**{f"0:{e}": 5 for e in range(4)}, "1:2": 9}
    assert routing_entropy(uniform_then_single, layers=2, experts=4) == pytest.approx(0.5)
    half = {"0:0": 1, "0:1": 1}
    assert routing_entropy(half, layers=1, experts=4) == pytest.approx(math.log(2) / math.log(4))
    assert routing_entropy({}, layers=1, experts=4) is None
