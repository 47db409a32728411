"""Byte views: tensors to and from little-endian wire bytes through torch alone (no numpy)."""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # torch byte views are native-endian; the wire is little-endian
    raise ImportError("aggregation.codec supports little-endian hosts only")


def to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    buffer = bytearray(flat.numel())
    if buffer:
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(flat)
    return bytes(buffer)


def from_bytes(data: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    # a fresh, aligned, writable copy: bounded by the section's length, which lies in the payload
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)
