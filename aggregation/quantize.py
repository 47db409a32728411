"""Value encodings: how an update's kept values become bytes, and are checked coming back.

- fp32 / fp16 / bf16: raw little-endian values;
- int8 / int4: unbiased stochastic rounding q = floor(x/s + u), u ~ U[0, 1), so E[q*s] = x.
  Without `clip` every chunk of `chunk` values has its own absmax scale (the member's own);
  with `clip` the whole tensor shares s = clip/qmax with every member, values are clamped to
  [-clip, clip] first, and no scale is sent: that is what makes members' integer vectors
  summable under secure aggregation. int4 packs two values in [-7, 7] per byte.
A section's value part is [per-chunk fp32 scales][values]; the scales are absent with a clip.
"""

from __future__ import annotations

import torch

from aggregation.byteview import from_bytes, to_bytes
from aggregation.codec_config import QMAX, CodecConfig

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def values_nbytes(kept: int, config: CodecConfig) -> int:
    if config.quant in FLOAT_DTYPES:
        return kept * FLOAT_DTYPES[config.quant].itemsize
    return kept if config.quant == "int8" else (kept + 1) // 2


def scales_nbytes(kept: int, config: CodecConfig) -> int:
    if config.quant not in QMAX or config.clip is not None:
        return 0
    return 4 * -(-kept // config.chunk)


def shared_scale(config: CodecConfig) -> float:
    """The scale every member's integers share (clip/qmax in fp32): what decode(),
    decode_integers() and dequantize_sum() multiply by."""
    assert config.clip is not None
    return float(torch.tensor(config.clip / QMAX[config.quant], dtype=torch.float32))


# ---------------------------------------------------------------- encode


def encode_values(
    kept: torch.Tensor, config: CodecConfig, generator: torch.Generator | None
) -> bytes:
    """[scales][values] of fp32 `kept`; `generator` is the member's randomness for rounding."""
    if config.quant in FLOAT_DTYPES:
        dtype = FLOAT_DTYPES[config.quant]
        # saturate instead of overflowing to inf (fp16 tops out at 65504); error feedback keeps the rest
        limit = torch.finfo(dtype).max
        return to_bytes(kept.clamp(-limit, limit).to(dtype))
    q, scales = quantize(kept, config, generator)
    packed = q if config.quant == "int8" else _pack_int4(q)
    return (b"" if scales is None else to_bytes(scales)) + to_bytes(packed)


def quantize(
    values: torch.Tensor, config: CodecConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q int8 in [-qmax, qmax] (kept,), per-chunk fp32 scales or None with a shared clip)."""
    qmax = QMAX[config.quant]
    n = values.numel()
    scales: torch.Tensor | None
    if config.clip is not None:
        scaled = values.clamp(-config.clip, config.clip) / torch.tensor(shared_scale(config))
        scales = None
    else:
        pad = (-n) % config.chunk
        chunks = torch.cat([values, values.new_zeros(pad)]).view(
            -1, config.chunk
        )  # (n_chunks, chunk)
        scales = chunks.abs().amax(dim=1) / qmax  # (n_chunks,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        scaled = (chunks / safe.view(-1, 1)).flatten()[:n]
    noise = torch.rand(n, generator=generator)  # member-local randomness: unbiased rounding
    q = torch.floor(scaled + noise).clamp(-qmax, qmax).to(torch.int8)
    return q, scales


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    nibbles = q.to(torch.int64) & 0xF  # two's complement nibble; -8 never occurs
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


# ---------------------------------------------------------------- decode


def scales_from(data: bytes | memoryview) -> torch.Tensor | str:
    """Per-chunk fp32 scales, or why they are refused."""
    scales = from_bytes(data, torch.float32)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        return "scales must be finite and non-negative"
    return scales


def values_from(data: bytes | memoryview, kept: int, config: CodecConfig) -> torch.Tensor | str:
    """fp32 values (float encodings) or int8 values in [-qmax, qmax] (int8/int4), or why not."""
    if config.quant in FLOAT_DTYPES:
        floats = from_bytes(data, FLOAT_DTYPES[config.quant]).to(torch.float32)
        if not bool(torch.isfinite(floats).all()):
            return "has NaN/Inf values"
        return floats
    if config.quant == "int8":
        ints = from_bytes(data, torch.int8)
        if bool((ints == -128).any()):
            return "int8 value -128 is outside [-127, 127]"
        return ints
    packed = from_bytes(data, torch.uint8).to(torch.int64)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()  # (2 * len,)
    if bool((nibbles == 8).any()):
        return "int4 value -8 is outside [-7, 7]"
    if nibbles.numel() > kept and int(nibbles[-1]) != 0:
        return "int4 padding nibble is not zero"
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)[:kept].to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor | None, config: CodecConfig) -> torch.Tensor:
    n = q.numel()
    if scales is None:
        return q.to(torch.float32) * torch.tensor(shared_scale(config), dtype=torch.float32)
    pad = (-n) % config.chunk
    chunks = torch.cat([q.to(torch.float32), torch.zeros(pad)]).view(
        -1, config.chunk
    )  # (n_chunks, chunk)
    return (chunks * scales.view(-1, 1)).flatten()[:n]
