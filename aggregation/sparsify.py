"""Sparsification: which coordinates of a tensor an update keeps, and how topk's indices travel.

- randk: keep k = round(density * numel) coordinates chosen by a keyed hash of (round seed,
  tensor name), identical on every member and recomputed by the server, so no index is sent;
- topk: keep the k largest |x|; indices travel as LEB128 varints of their gaps (~2 bytes each
  at density ~0.003, half of int32). Not secure-aggregation compatible: coordinates differ.
Kept values are NOT rescaled by 1/density: the estimate is biased towards zero on purpose and
the member's error feedback (aggregation/feedback.py) carries what was not sent into later rounds.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

from aggregation.byteview import from_bytes, to_bytes
from aggregation.codec_config import CodecConfig

VARINT_MAX_BYTES = 5  # 35 bits: gaps of tensors up to 2**31 elements need at most 5 bytes


def kept_count(numel: int, density: float) -> int:
    """k for randk/topk: round(density * numel) (half up), at least 1, at most numel."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


# ---------------------------------------------------------------- randk: shared coordinates

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 without overflowing int64: split h into 16-bit halves
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3's finalizer: a bijection of [0, 2**32) with full avalanche
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def randk_indices(name: str, numel: int, density: float, seed: int) -> torch.Tensor:
    """Shared-seed random-k coordinates: sorted unique int64, identical on every member for a seed.

    The coordinates are the k smallest images of a keyed permutation of [0, 2**32) (murmur3
    finalizers around key words from sha256(seed, name)). That is plain integer arithmetic, so
    unlike torch.randperm under a seeded Generator it cannot change with the torch version,
    platform or thread count: members on different installs still agree bit for bit.
    """
    if not 0 <= numel < 2**31:
        raise ValueError(f"randk needs 0 <= numel < 2**31, got {numel}")
    k = kept_count(numel, density)
    if k == numel:
        return torch.arange(numel, dtype=torch.int64)
    digest = hashlib.sha256(
        b"fedmoe.randk\0" + str(int(seed)).encode() + b"\0" + name.encode()
    ).digest()
    k0, k1, k2, k3 = struct.unpack("<4I", digest[:16])
    h = torch.arange(numel, dtype=torch.int64)
    h = _fmix32(h ^ k0)
    h = _fmix32((h + k1) & _M32 ^ k2)
    h = _fmix32((h + k3) & _M32)  # (numel,) distinct values: the composition is a bijection
    chosen = torch.topk(h, k, largest=False, sorted=False).indices
    return torch.sort(chosen).values


def kept_indices(name: str, numel: int, config: CodecConfig, seed: int) -> torch.Tensor | None:
    """randk coordinates, or None when every coordinate is kept in order (no sparsification)."""
    if config.sparsify == "randk":
        return randk_indices(name, numel, config.density, seed)
    return None


# ---------------------------------------------------------------- topk: indices as varint gaps


def select(
    name: str, flat: torch.Tensor, config: CodecConfig, seed: int
) -> tuple[torch.Tensor, bytes]:
    """(sorted kept coordinates of flat fp32 `flat`, the index bytes that travel: topk's only)."""
    numel = flat.numel()
    if config.sparsify == "topk":
        k = kept_count(numel, config.density)
        indices = torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
        return indices, indices_to_bytes(indices)
    indices_or_none = kept_indices(name, numel, config, seed)
    return (torch.arange(numel) if indices_or_none is None else indices_or_none), b""


def indices_to_bytes(indices: torch.Tensor) -> bytes:
    """Strictly increasing indices as LEB128 varints of their gaps (`topk_indices_from` reads them)."""
    return varint_encode(torch.diff(indices, prepend=indices.new_zeros(1)))  # first gap: the index itself


def topk_indices_from(data: bytes | memoryview, kept: int, numel: int) -> torch.Tensor | str:
    """The `kept` strictly increasing indices in [0, numel) that `data` holds as gaps, or why."""
    if not kept:
        return torch.empty(0, dtype=torch.int64)
    gaps = varint_decode(data, kept)
    if isinstance(gaps, str):
        return gaps
    if bool((gaps[1:] == 0).any()):
        return "indices are not strictly increasing"
    # capping each gap at numel keeps the cumulative sum far from int64 overflow
    indices = torch.cumsum(gaps.clamp(max=numel), 0)
    out_of_range = int((indices >= numel).sum())
    if out_of_range:
        return f"{out_of_range} indices out of range [0, {numel})"
    return indices


def varint_encode(values: torch.Tensor) -> bytes:
    """LEB128 of non-negative int64 values < 2**35, vectorized."""
    values = values.to(torch.int64)
    lengths = torch.ones_like(values)
    for j in range(1, VARINT_MAX_BYTES):
        lengths += (values >= (1 << (7 * j))).to(torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    out = torch.zeros(int(lengths.sum()), dtype=torch.int64)
    for j in range(VARINT_MAX_BYTES):
        has = lengths > j
        byte = (values[has] >> (7 * j)) & 0x7F
        more = (lengths[has] > j + 1).to(torch.int64) << 7
        out[starts[has] + j] = byte | more
    return to_bytes(out.to(torch.uint8))


def varint_decode(data: bytes | memoryview, count: int) -> torch.Tensor | str:
    """Exactly `count` canonical LEB128 values filling `data`, or why not."""
    raw = from_bytes(data, torch.uint8).to(torch.int64)
    terminal = (raw & 0x80) == 0
    if raw.numel() == 0 or not bool(terminal[-1]):
        return "index varints are truncated"
    ends = torch.nonzero(terminal).flatten()
    if ends.numel() != count:
        return f"{ends.numel()} indices, expected {count}"
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    lengths = ends - starts + 1
    if bool((lengths > VARINT_MAX_BYTES).any()):
        return "an index varint is longer than 5 bytes"
    if bool(((lengths > 1) & (raw[ends] == 0)).any()):
        return "an index varint is not canonical (overlong)"
    group = torch.repeat_interleave(torch.arange(count), lengths)  # (len(data),)
    position = torch.arange(raw.numel()) - starts[group]
    return torch.zeros(count, dtype=torch.int64).index_add_(
        0, group, (raw & 0x7F) << (7 * position)
    )
