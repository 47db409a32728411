from __future__ import annotations

import pytest
import torch

from aggregation.broadcast import PatchError, advance, apply_patch, decode_step, encode_step, split_view, step_view, view_digest
from model.io import tensors_to_bytes


def states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    old = {"adapter": torch.randn(64, 8, generator=g), "expert.e0": torch.randn(128, 8, generator=g)}
    new = {"adapter": old["adapter"] + 1e-2 * torch.randn(64, 8, generator=g), "expert.e0": old["expert.e0"]}
    return old, new


def test_patch_gives_the_member_bit_identical_view_and_is_about_4x_smaller() -> None:
    old, new = states()
    view1, none = advance(None, old)
    assert none is None and all(torch.equal(view1[k], old[k]) for k in old)
    view2, patch = advance(view1, new)
    assert patch is not None and "expert.e0::q" not in patch  # unchanged expert: not sent
    member_view = apply_patch(view1, patch)
    assert view_digest(member_view) == view_digest(view2)
    # the view tracks the global state within half a quantization step
    step = (new["adapter"] - old["adapter"]).abs().max() / 127
    assert (view2["adapter"] - new["adapter"]).abs().max() <= step / 2 + 1e-7
    adapter_fp32 = len(tensors_to_bytes({"adapter": new["adapter"]}))
    assert len(tensors_to_bytes(patch)) < adapter_fp32 / 3


def test_error_does_not_accumulate_over_rounds() -> None:
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(4096, generator=g)}
    view, _ = advance(None, state)
    for _ in range(50):
        state = {"w": state["w"] + 1e-3 * torch.randn(4096, generator=g)}
        view, _ = advance(view, state)
    # the lag is one patch's rounding, not 50 rounds' worth
    assert (view["w"] - state["w"]).abs().max() < 1e-3 * 5 / 127


def test_inconsistent_patch_is_refused() -> None:
    old, new = states()
    view1, _ = advance(None, old)
    _, patch = advance(view1, new)
    assert patch is not None
    bad = dict(patch)
    bad["adapter::q"] = bad["adapter::q"][:-1]
    with pytest.raises(PatchError, match="adapter"):
        apply_patch(view1, bad)
    bad = dict(patch)
    bad["adapter::scale"] = torch.full_like(patch["adapter::scale"], float("nan"))
    with pytest.raises(PatchError, match="finite"):
        apply_patch(view1, bad)
    with pytest.raises(PatchError, match="no such tensor"):
        apply_patch(view1, {"nope::q": patch["adapter::q"], "nope::scale": patch["adapter::scale"]})


def _step_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    sparse = torch.zeros(40, 8)
    sparse.view(-1)[torch.tensor([3, 100, 101, 319])] = torch.randn(4, generator=g)
    return {"dense": torch.randn(16, 4, generator=g), "sparse": sparse, "zero": torch.zeros(5)}


def test_a_step_travels_exactly_with_its_zeros_and_only_its_nonzeros() -> None:
    delta = _step_delta()
    payload = encode_step(delta)
    assert payload["sparse::val"].numel() == 4 and "dense::idx" not in payload
    assert payload["zero::val"].numel() == 0  # listed: a zero update still moves momentum
    decoded = decode_step(payload, {k: tuple(v.shape) for k, v in delta.items()})
    assert set(decoded) == set(delta) and all(torch.equal(decoded[k], delta[k]) for k in delta)
    assert len(tensors_to_bytes(payload)) < len(tensors_to_bytes(delta)) / 2


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.update({"sparse::val": p["sparse::val"][:-1]}), "indices, expected 3"),
        (lambda p: p.update({"sparse::val": p["sparse::val"].double()}), "float32"),
        (lambda p: p.update({"dense::val": torch.full((64,), float("inf"))}), "finite"),
        (lambda p: p.update({"dense::val": torch.zeros(63)}), "expected 64"),
        (lambda p: p.update({"zero::idx": torch.tensor([1], dtype=torch.uint8)}), "indices"),
        (lambda p: p.update({"other::val": torch.zeros(3)}), "no such tensor"),
        (lambda p: p.update({"dense": torch.zeros(64)}), "no such tensor"),
        (lambda p: p.update({"dense::val::idx": torch.zeros(1000, dtype=torch.float64)}), "no such tensor"),
    ],
)
def test_malformed_step_is_refused(damage, match) -> None:
    delta = _step_delta()
    payload = encode_step(delta)
    damage(payload)
    with pytest.raises(PatchError, match=match):
        decode_step(payload, {k: tuple(v.shape) for k, v in delta.items()})


def test_step_view_round_trips_state_and_optimizer_state() -> None:
    state = {"w": torch.ones(3)}
    opt = {"m/w": torch.zeros(3), "t/w": torch.tensor(2, dtype=torch.int64)}
    view = step_view(state, opt)
    assert set(view) == {"w", "opt/m/w", "opt/t/w"}
    back_state, back_opt = split_view(view)
    assert back_state.keys() == state.keys() and back_opt.keys() == opt.keys()
    assert back_opt["t/w"].dtype == torch.int64


def test_a_step_keeps_the_sign_of_zero() -> None:
    # -0.0 and +0.0 step a momentum differently in its last bit: the member must get the same bits
    delta = {"w": torch.tensor([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])}
    decoded = decode_step(encode_step(delta), {"w": (8,)})
    assert torch.equal(decoded["w"].view(torch.int32), delta["w"].view(torch.int32))
