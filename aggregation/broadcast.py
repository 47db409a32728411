"""Server -> member broadcast compression: members get an int8 delta of what changed.

The server keeps one canonical *view* chain of the global trainable state:

    view_1 = G_0                                   (first round: exact copy)
    view_r = view_{r-1} + Q(G_{r-1} - view_{r-1})   (Q: int8 with one scale per chunk)

A member that holds view_{r-1} gets only the patch Q(G_{r-1} - view_{r-1}): tensors that did not
change are omitted (experts nobody trained) and the rest cost one byte per value plus a scale per
chunk. Any other member gets view_r in full (fp32). Either way every member trains from exactly
the same numbers, bit for bit (the patch is applied with the same arithmetic on both sides), so
resumes stay exact, and a digest of the view lets both sides check they agree. The view lags the
global state by at most half a quantization step of the last patch: the next patch carries the
rest (error feedback on the server side).

Hand-written: a few tensor operations specific to fedmoe's trainable state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

CHUNK = 256
_Q = "::q"
_SCALE = "::scale"


class PatchError(ValueError):
    """A patch does not apply to the view it is meant for."""


def view_digest(view: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(view):
        tensor = view[name].detach().contiguous()
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _chunks(flat: torch.Tensor) -> torch.Tensor:
    pad = (-flat.numel()) % CHUNK
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, CHUNK)  # (n_chunks, CHUNK)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, numel: int) -> torch.Tensor:
    chunks = q.to(torch.float32).view(-1, CHUNK) * scale.view(-1, 1)  # (n_chunks, CHUNK)
    return chunks.flatten()[:numel]


def advance(
    view: Mapping[str, torch.Tensor] | None, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(next view, patch from `view` to it); no previous view: (exact copy of state, None)."""
    if view is None:
        return {k: v.detach().to(torch.float32).clone() for k, v in sorted(state.items())}, None
    patch: dict[str, torch.Tensor] = {}
    for name, value in sorted(state.items()):
        diff = (value.to(torch.float32) - view[name]).flatten()
        if not bool(diff.any()):
            continue
        chunks = _chunks(diff)
        scale = chunks.abs().amax(dim=1) / 127.0  # (n_chunks,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(chunks / safe.view(-1, 1)).clamp(-127, 127).to(torch.int8)
        patch[name + _Q] = q.flatten().contiguous()
        patch[name + _SCALE] = scale.contiguous()
    return apply_patch(view, patch), patch


def apply_patch(view: Mapping[str, torch.Tensor], patch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {name: value.clone() for name, value in view.items()}
    for key, q in patch.items():
        if key.endswith(_SCALE):
            continue
        name = key.removesuffix(_Q)
        scale = patch.get(name + _SCALE)
        if not key.endswith(_Q) or name not in out or scale is None:
            raise PatchError(f"patch entry {key!r}: no such tensor in the view, or its scale is missing")
        numel = out[name].numel()
        n_chunks = -(-numel // CHUNK)
        if q.dtype != torch.int8 or q.numel() != n_chunks * CHUNK or scale.numel() != n_chunks:
            raise PatchError(f"patch for {name!r}: {q.numel()} values / {scale.numel()} scales do not fit {numel}")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise PatchError(f"patch for {name!r}: scales must be finite and non-negative")
        out[name] = out[name] + _dequantize(q, scale.to(torch.float32), numel).view_as(out[name])
    return dict(sorted(out.items()))
