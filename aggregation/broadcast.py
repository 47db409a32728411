"""Server -> member broadcast compression: send only what changed since the member's last view.

A member's *view* is the global trainable state rounded to the broadcast dtype (fp16 by
default). The server remembers which view each member holds and sends a patch: tensors whose
rounded values did not change are omitted (experts nobody trained), and a tensor where few
rounded values changed is sent as a bitmap of changed coordinates plus the new values. The
member's view after a patch is bit-identical to the rounded global state, so a member that
gets a patch and one that gets the full state train from exactly the same numbers (resumes
stay exact), and a digest of the view lets both sides check they agree.

Hand-written because it is a few tensor operations specific to fedmoe's trainable state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

_MASK = "::mask"
_VALUES = "::values"


class PatchError(ValueError):
    """A patch does not apply to the view it is meant for."""


def view_of(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: value.detach().to(dtype).contiguous() for name, value in sorted(state.items())}


def view_digest(view: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(view):
        tensor = view[name].contiguous()
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)  # (n/8, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1  # (n/8, 8)
    return bits.flatten()[:numel].to(torch.bool)


def make_patch(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `new` that differ from `old` (dense, or bitmap + values when sparse)."""
    patch: dict[str, torch.Tensor] = {}
    for name, value in new.items():
        before = old.get(name)
        if before is None or before.shape != value.shape or before.dtype != value.dtype:
            patch[name] = value
            continue
        changed = (before.view(-1) != value.view(-1)) | (torch.isnan(value.view(-1).float()))
        count = int(changed.sum())
        if count == 0:
            continue
        # bitmap (numel/8 bytes) + changed values vs all values: pick the smaller
        if count * value.element_size() + value.numel() / 8 < value.numel() * value.element_size():
            patch[name + _MASK] = _pack_bits(changed)
            patch[name + _VALUES] = value.view(-1)[changed].contiguous()
        else:
            patch[name] = value
    return patch


def apply_patch(view: Mapping[str, torch.Tensor], patch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {name: value.clone() for name, value in view.items()}
    for key, value in patch.items():
        if key.endswith(_VALUES):
            continue
        if key.endswith(_MASK):
            name = key.removesuffix(_MASK)
            if name not in out or name + _VALUES not in patch:
                raise PatchError(f"patch for {name!r}: no such tensor in the view, or values missing")
            flat = out[name].view(-1)
            changed = _unpack_bits(value, flat.numel())
            values = patch[name + _VALUES]
            if int(changed.sum()) != values.numel() or values.dtype != flat.dtype:
                raise PatchError(f"patch for {name!r}: {values.numel()} values for {int(changed.sum())} changed coordinates")
            flat[changed] = values
        else:
            out[key] = value.clone()
    return dict(sorted(out.items()))
