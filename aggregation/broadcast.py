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

`broadcast = "step"` sends instead what moved the state: the round's aggregated update, exact
(fp32; only its non-zeros when the codec is randk or topk). The member holds the state and the
server optimizer's state, and replays the optimizer's step itself (the same torch operations on
the same numbers give the same bits; the digest checks it). Its view is the global state exactly,
and a round's download is about the size of a round's upload. Why not a sparse patch of the
state: a server optimizer with momentum (FedYogi) moves every coordinate about η each round, so a
patch that sends the largest few per cent leaves the members far behind the state they are
trained for, and the run diverges (measured, README).

Hand-written: a few tensor operations specific to fedmoe's trainable state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from aggregation.byteview import from_bytes, to_bytes
from aggregation.sparsify import indices_to_bytes, topk_indices_from

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
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
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


# ------------------------------------------------- step: members replay the server's optimizer step

OPT_PREFIX = "opt/"  # a "step" view holds the server optimizer's state under this prefix
_IDX, _VAL = "::idx", "::val"
DENSE_ABOVE = 0.5  # a tensor of the step with more non-zeros than this share travels dense


def step_view(state: Mapping[str, torch.Tensor], opt_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a member holds under `broadcast = "step"`: the global state and the optimizer's state."""
    return dict(sorted({**state, **{OPT_PREFIX + k: v for k, v in opt_state.items()}}.items()))


def split_view(view: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, optimizer state) of a step view."""
    state = {k: v for k, v in view.items() if not k.startswith(OPT_PREFIX)}
    return state, {k.removeprefix(OPT_PREFIX): v for k, v in view.items() if k.startswith(OPT_PREFIX)}


def encode_step(delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The round's aggregated update, exactly (fp32), as few bytes as its zeros allow.

    Every tensor of `delta` is listed, an all-zero one too (a server optimizer with momentum
    moves a tensor it gets a zero update for, and leaves alone one it gets none for). Sparse
    tensors (a randk or topk round) send their non-zero values and LEB128 gaps of their indices.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in sorted(delta.items()):
        flat = value.detach().to(torch.float32).flatten().contiguous()
        indices = torch.nonzero(flat.view(torch.int32)).flatten()  # by bits: -0.0 travels as -0.0
        if indices.numel() > DENSE_ABOVE * flat.numel():
            out[name + _VAL] = flat
            continue
        out[name + _IDX] = from_bytes(indices_to_bytes(indices), torch.uint8)
        out[name + _VAL] = flat[indices].contiguous()
    return out


def decode_step(payload: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The aggregated update `encode_step` sent; any entry that does not fit `shapes` is a PatchError."""
    delta: dict[str, torch.Tensor] = {}
    for key in payload:
        name = key.removesuffix(_IDX) if key.endswith(_IDX) else key.removesuffix(_VAL)
        if key == name or name not in shapes or name + _VAL not in payload:
            raise PatchError(f"step entry {key!r}: no such tensor in the view, or its values are missing")
    for key, values in sorted(payload.items()):
        if not key.endswith(_VAL):
            continue
        name = key.removesuffix(_VAL)
        numel = math.prod(shapes[name])
        if values.dtype != torch.float32 or values.dim() != 1 or not bool(torch.isfinite(values).all()):
            raise PatchError(f"step for {name!r}: values must be a flat, finite float32 tensor")
        packed = payload.get(name + _IDX)
        if packed is None:
            if values.numel() != numel:
                raise PatchError(f"step for {name!r}: {values.numel()} dense values, expected {numel}")
            delta[name] = values.view(shapes[name]).clone()
            continue
        if packed.dtype != torch.uint8 or packed.dim() != 1 or values.numel() > numel or (packed.numel() and not values.numel()):
            raise PatchError(f"step for {name!r}: indices must be a flat uint8 tensor, at most {numel} values")
        indices = topk_indices_from(to_bytes(packed), values.numel(), numel)
        if isinstance(indices, str):
            raise PatchError(f"step for {name!r}: {indices}")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices] = values
        delta[name] = dense.view(shapes[name])
    return delta
