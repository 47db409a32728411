from __future__ import annotations

import pytest
import torch

from aggregation.broadcast import PatchError, apply_patch, make_patch, view_digest, view_of
from model.io import tensors_to_bytes


def states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    old = {"adapter": torch.randn(64, 8, generator=g), "expert.e0": torch.randn(128, 8, generator=g), "expert.e1": torch.randn(128, 8, generator=g)}
    new = dict(old)
    new["adapter"] = old["adapter"] + 1e-2 * torch.randn(64, 8, generator=g)  # every value moves
    sparse = old["expert.e0"].clone()
    sparse[3, :] += 0.5  # a few coordinates move
    new["expert.e0"] = sparse  # expert.e1 untouched: nobody trained it
    return old, new


def test_patch_reproduces_the_rounded_global_state_exactly_and_is_smaller() -> None:
    old, new = states()
    v_old, v_new = view_of(old, torch.float16), view_of(new, torch.float16)
    patch = make_patch(v_old, v_new)
    assert "expert.e1" not in patch and "expert.e0" not in patch and "expert.e0::mask" in patch
    applied = apply_patch(v_old, patch)
    assert view_digest(applied) == view_digest(v_new)
    assert all(torch.equal(applied[k], v_new[k]) for k in v_new)
    assert len(tensors_to_bytes(patch)) < 0.5 * len(tensors_to_bytes(v_new))


def test_digest_changes_with_any_value() -> None:
    _, new = states()
    view = view_of(new, torch.float16)
    other = dict(view)
    other["adapter"] = view["adapter"].clone()
    other["adapter"][0, 0] += 1
    assert view_digest(view) != view_digest(other)


def test_inconsistent_patch_is_refused() -> None:
    old, new = states()
    v_old = view_of(old, torch.float16)
    patch = make_patch(v_old, view_of(new, torch.float16))
    patch["expert.e0::values"] = patch["expert.e0::values"][:-1]
    with pytest.raises(PatchError, match="expert.e0"):
        apply_patch(v_old, patch)
