"""Update codec: the versioned, strict, bounded wire format members' compressed updates travel in.

The public front: encode() a member's update (name -> fp32 delta, a subset of the trainable
state), decode() it on the server (dense tensors), or decode_integers() / dequantize_sum() it
under secure aggregation (summable integers). Every payload the server refuses raises one
UpdateRejected line naming the member (and the tensor). The parts live beside it:
- aggregation/container.py: the FMC1 layout (prelude, canonical JSON header, sections) and its
  strict, bounded reading;
- aggregation/codec_config.py: the spec, `[randk<d>+|topk<d>+]<quant>`, e.g. "randk0.02+int8";
- aggregation/sparsify.py: which coordinates are kept (shared-seed randk, topk with varint gaps);
- aggregation/quantize.py: how kept values become bytes (fp32/fp16/bf16, stochastic int8/int4);
- aggregation/feedback.py: the member's error feedback, carrying what was not sent.

Hand-written: no library provides a strict, bounded, versioned update wire format composing
shared-seed sparsification, stochastic low-bit quantization and secure-aggregation-summable
integers; safetensors has no sparsity or quantization and trusts its header more than a server
facing untrusted members may. No pickle, no numpy: bytes are moved through torch byte views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from aggregation.codec_config import CodecConfig
from aggregation.container import Written, parse, write
from aggregation.quantize import (
    dequantize,
    encode_values,
    scales_nbytes,
    shared_scale,
    values_nbytes,
)
from aggregation.sparsify import kept_count, kept_indices, select


class UpdateRejected(ValueError):
    """A member's payload that the server refuses; the message is one line naming the member."""


@dataclass(frozen=True)
class _Reject:
    member: str

    def __call__(self, why: str, tensor: str | None = None) -> UpdateRejected:
        where = f"member {self.member!r}: " + ("" if tensor is None else f"tensor {tensor!r}: ")
        return UpdateRejected((where + why).replace("\n", " ").replace("\r", " "))


def encode(
    tensors: Mapping[str, torch.Tensor],
    config: CodecConfig,
    *,
    seed: int,
    generator: torch.Generator | None = None,
) -> bytes:
    """The wire payload of an update; `seed` is the round's shared seed (randk coordinates),
    `generator` the member's own randomness for stochastic rounding."""
    sections: list[Written] = []
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r}: only named floating-point tensors can be encoded")
        flat = tensor.detach().to(torch.float32).reshape(-1).cpu()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"tensor {name!r}: has NaN/Inf values")
        indices, index_bytes = select(name, flat, config, seed)
        values = encode_values(flat[indices], config, generator)
        kept = int(indices.numel())
        sections.append(Written(name, tuple(tensor.shape), tensor.dtype, kept, index_bytes, values))
    return write(config, sections)


def _scatter(
    values: torch.Tensor, indices: torch.Tensor | None, shape: tuple[int, ...]
) -> torch.Tensor:
    if indices is None:
        return values.reshape(shape).clone()
    dense = torch.zeros(math.prod(shape), dtype=torch.float32)
    dense[indices] = values
    return dense.view(shape)


def decode(
    payload: bytes,
    expected: Mapping[str, tuple[int, ...]],
    *,
    member: str,
    max_bytes: int,
    seed: int | None = None,
    config: CodecConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors (zeros at unsent coordinates) for the names the payload carries.

    `expected` is the trainable manifest (name -> shape); `config`, when given, is the round's
    codec and the payload must use exactly it; `seed` is the round seed (randk coordinates).
    Raises UpdateRejected, and nothing else, for any payload it does not accept.
    """
    codec, sections = parse(payload, expected, max_bytes, seed, config, _Reject(member))
    out: dict[str, torch.Tensor] = {}
    for section in sections:
        if section.floats is not None:
            values = section.floats
        else:
            assert section.ints is not None
            values = dequantize(section.ints, section.scales, codec)
            if not bool(torch.isfinite(values).all()):  # a huge scale times 127 overflows fp32
                raise _Reject(member)("dequantized values overflow fp32", section.name)
        out[section.name] = _scatter(values, section.indices, section.shape)
    return out


def decode_integers(
    payload: bytes,
    expected: Mapping[str, tuple[int, ...]],
    *,
    member: str,
    max_bytes: int,
    seed: int,
    config: CodecConfig,
) -> dict[str, tuple[torch.Tensor, float]]:
    """name -> (int64 values of the kept coordinates, shared scale), not dequantized.

    For secure aggregation: with a secure-compatible config every member's vector has the same
    coordinates and scale, so sum_members(ints) * scale == sum_members(decode(...)) (up to fp32
    rounding), and dequantize_sum() turns the summed vector back into a dense tensor.
    """
    if not config.secure_compatible:
        raise ValueError(f"codec {config} (clip {config.clip}) has no shared coordinates and scale")
    _, sections = parse(payload, expected, max_bytes, seed, config, _Reject(member))
    scale = shared_scale(config)
    return {s.name: (s.ints.to(torch.int64), scale) for s in sections if s.ints is not None}


def dequantize_sum(
    name: str,
    total: torch.Tensor,
    scale: float,
    shape: tuple[int, ...],
    config: CodecConfig,
    *,
    seed: int,
) -> torch.Tensor:
    """Dense fp32 tensor from a summed integer vector of `name`'s kept coordinates."""
    numel = math.prod(shape)
    kept = numel if config.sparsify == "none" else kept_count(numel, config.density)
    if not config.secure_compatible or total.shape != (kept,):
        raise ValueError(
            f"tensor {name!r}: summed vector of shape {tuple(total.shape)}, expected ({kept},)"
        )
    values = (total.to(torch.float64) * scale).to(torch.float32)
    return _scatter(values, kept_indices(name, numel, config, seed), shape)


def encoded_nbytes(shapes: Mapping[str, tuple[int, ...]], config: CodecConfig) -> int | None:
    """Body bytes an update of these shapes costs (header excluded); None for topk (varint indices)."""
    if config.sparsify == "topk":
        return None
    total = 0
    for shape in shapes.values():
        numel = math.prod(shape)
        kept = numel if config.sparsify == "none" else kept_count(numel, config.density)
        total += scales_nbytes(kept, config) + values_nbytes(kept, config)
    return total
