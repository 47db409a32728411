"""Update codec: the versioned, strict, bounded wire format members' compressed updates travel in.

A member's update (name -> fp32 delta, a subset of the trainable state) is encoded as

    b"FMC1" | u8 version (=1) | u32 header length (little-endian) | header | body

The header is canonical JSON (sorted keys, no whitespace): the codec string, the chunk size,
the shared clip (or null) and one entry per tensor, in name order, with its shape, original
dtype, number of kept values and the offset/length of its section in the body. Sections are
laid out back to back; each is [topk indices][per-chunk fp32 scales][values].

Encodings (composable as `[randk<d>+|topk<d>+]<quant>`, e.g. "randk0.02+int8"):
- fp32 / fp16 / bf16: raw little-endian values;
- int8 / int4: unbiased stochastic rounding q = floor(x/s + u), u ~ U[0, 1), so E[q*s] = x.
  Without `clip` every chunk of `chunk` values has its own absmax scale (the member's own);
  with `clip` the whole tensor shares s = clip/qmax with every member, values are clamped to
  [-clip, clip] first, and no scale is sent: that is what makes members' integer vectors
  summable under secure aggregation. int4 packs two values in [-7, 7] per byte;
- randk: keep k = round(density * numel) coordinates chosen by a keyed hash of (round seed,
  tensor name), identical on every member and recomputed by the server, so no index is sent;
- topk: keep the k largest |x|; indices travel as LEB128 varints of their gaps (~2 bytes each
  at density ~0.003, half of int32). Not secure-aggregation compatible: coordinates differ.
Kept values are NOT rescaled by 1/density: the estimate is biased towards zero on purpose and
the member's error feedback (ErrorFeedback) carries what was not sent into later rounds.

Decoding is strict and bounded: the size limit is checked before anything else, every header
field is type- and range-checked against the model's manifest (`expected`) before any size it
implies is allocated, sections must tile the body exactly, and every refusal is one
UpdateRejected line naming the member (and the tensor). Allocation is at most a few times the
payload plus the dense tensors of the manifest entries the payload names.

Hand-written: no library provides a strict, bounded, versioned update wire format composing
shared-seed sparsification, stochastic low-bit quantization and secure-aggregation-summable
integers; safetensors has no sparsity or quantization and trusts its header more than a server
facing untrusted members may. No pickle, no numpy: bytes are moved through torch byte views.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC = b"FMC1"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
_PRELUDE = struct.Struct("<4sBI")  # magic, version, header length

QUANTS = ("fp32", "fp16", "bf16", "int8", "int4")
SPARSIFIERS = ("none", "randk", "topk")
_QMAX = {"int8": 127, "int4": 7}
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ORIGINAL_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_MAX_CHUNK = 1 << 20
_VARINT_MAX_BYTES = 5  # 35 bits: gaps of tensors up to 2**31 elements need at most 5 bytes
_SPEC = re.compile(r"(?:(randk|topk)(\d+(?:\.\d*)?(?:e-?\d+)?)\+)?(fp32|fp16|bf16|int8|int4)")
_ENTRY_KEYS = {"name", "shape", "dtype", "kept", "offset", "length", "index_bytes"}
_HEADER_KEYS = {"codec", "chunk", "clip", "tensors"}

if sys.byteorder != "little":  # torch byte views are native-endian; the wire is little-endian
    raise ImportError("aggregation.codec supports little-endian hosts only")


class UpdateRejected(ValueError):
    """A member's payload that the server refuses; the message is one line naming the member."""


@dataclass(frozen=True)
class CodecConfig:
    quant: str = "fp16"  # "fp32" | "fp16" | "bf16" | "int8" | "int4"
    sparsify: str = "none"  # "none" | "randk" | "topk"
    density: float = 1.0  # fraction of coordinates kept by randk/topk, (0, 1]
    chunk: int = 256  # int8/int4 without clip: one (member's own) scale per chunk of values
    # int8/int4: shared range [-clip, clip] and scale clip/qmax on every member (summable blind)
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ValueError(f"codec quant {self.quant!r} is not one of {', '.join(QUANTS)}")
        if self.sparsify not in SPARSIFIERS:
            raise ValueError(
                f"codec sparsify {self.sparsify!r} is not one of {', '.join(SPARSIFIERS)}"
            )
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"codec density {self.density!r} is not a number")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"codec density {self.density!r} is not in (0, 1]")
        if self.sparsify == "none" and self.density != 1.0:
            raise ValueError("codec density must be 1.0 without randk/topk")
        if (
            isinstance(self.chunk, bool)
            or not isinstance(self.chunk, int)
            or not 1 <= self.chunk <= _MAX_CHUNK
        ):
            raise ValueError(f"codec chunk {self.chunk!r} is not an integer in [1, {_MAX_CHUNK}]")
        if self.clip is not None:
            if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)):
                raise TypeError(f"codec clip {self.clip!r} is not a number")
            if not (math.isfinite(self.clip) and self.clip > 0):
                raise ValueError(f"codec clip {self.clip!r} must be finite and positive")
            if self.quant not in _QMAX:
                raise ValueError(f"codec clip applies to int8/int4 only, not {self.quant}")
            object.__setattr__(self, "clip", float(self.clip))  # header JSON writes a float, always
        object.__setattr__(self, "density", float(self.density))

    @classmethod
    def parse(cls, spec: str, *, chunk: int = 256, clip: float | None = None) -> CodecConfig:
        """'fp16', 'int8', 'randk0.02+int8', 'topk0.005+int8', ...; ValueError naming the spec."""
        match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(
                f"codec {spec!r} is not [randk<density>+|topk<density>+]<fp32|fp16|bf16|int8|int4>, "
                "e.g. 'randk0.02+int8'"
            )
        sparsify, density, quant = match.groups()
        try:
            return cls(quant, sparsify or "none", float(density) if density else 1.0, chunk, clip)
        except ValueError as err:
            raise ValueError(f"codec {spec!r}: {err}") from None

    def __str__(self) -> str:
        if self.sparsify == "none":
            return self.quant
        return f"{self.sparsify}{self.density!r}+{self.quant}"

    @property
    def secure_compatible(self) -> bool:
        """Members' integer vectors can be summed blind: same coordinates and same scale everywhere."""
        return self.sparsify != "topk" and self.quant in _QMAX and self.clip is not None


# ---------------------------------------------------------------- shared coordinates


def kept_count(numel: int, density: float) -> int:
    """k for randk/topk: round(density * numel) (half up), at least 1, at most numel."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


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


def _kept_indices(name: str, numel: int, config: CodecConfig, seed: int) -> torch.Tensor | None:
    """randk coordinates, or None when every coordinate is kept in order (no sparsification)."""
    if config.sparsify == "randk":
        return randk_indices(name, numel, config.density, seed)
    return None


# ---------------------------------------------------------------- byte views (no numpy)


def _to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    buffer = bytearray(flat.numel())
    if buffer:
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(flat)
    return bytes(buffer)


def _from_bytes(data: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    # a fresh, aligned, writable copy: bounded by the section's length, which lies in the payload
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _varint_encode(values: torch.Tensor) -> bytes:
    """LEB128 of non-negative int64 values < 2**35, vectorized."""
    values = values.to(torch.int64)
    lengths = torch.ones_like(values)
    for j in range(1, _VARINT_MAX_BYTES):
        lengths += (values >= (1 << (7 * j))).to(torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    out = torch.zeros(int(lengths.sum()), dtype=torch.int64)
    for j in range(_VARINT_MAX_BYTES):
        has = lengths > j
        byte = (values[has] >> (7 * j)) & 0x7F
        more = (lengths[has] > j + 1).to(torch.int64) << 7
        out[starts[has] + j] = byte | more
    return _to_bytes(out.to(torch.uint8))


def _varint_decode(data: bytes | memoryview, count: int) -> torch.Tensor | str:
    """Exactly `count` canonical LEB128 values filling `data`, or why not."""
    raw = _from_bytes(data, torch.uint8).to(torch.int64)
    terminal = (raw & 0x80) == 0
    if raw.numel() == 0 or not bool(terminal[-1]):
        return "index varints are truncated"
    ends = torch.nonzero(terminal).flatten()
    if ends.numel() != count:
        return f"{ends.numel()} indices, expected {count}"
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    lengths = ends - starts + 1
    if bool((lengths > _VARINT_MAX_BYTES).any()):
        return "an index varint is longer than 5 bytes"
    if bool(((lengths > 1) & (raw[ends] == 0)).any()):
        return "an index varint is not canonical (overlong)"
    group = torch.repeat_interleave(torch.arange(count), lengths)  # (len(data),)
    position = torch.arange(raw.numel()) - starts[group]
    return torch.zeros(count, dtype=torch.int64).index_add_(
        0, group, (raw & 0x7F) << (7 * position)
    )


# ---------------------------------------------------------------- quantization


def _values_nbytes(kept: int, config: CodecConfig) -> int:
    if config.quant in _FLOAT_DTYPES:
        return kept * _FLOAT_DTYPES[config.quant].itemsize
    return kept if config.quant == "int8" else (kept + 1) // 2


def shared_scale(config: CodecConfig) -> float:
    """The scale every member's integers share (clip/qmax in fp32): what dequantize_sum multiplies by."""
    return _shared_scale(config)


def _scales_nbytes(kept: int, config: CodecConfig) -> int:
    if config.quant not in _QMAX or config.clip is not None:
        return 0
    return 4 * -(-kept // config.chunk)


def _shared_scale(config: CodecConfig) -> float:
    """clip/qmax as the fp32 number both decode() and decode_integers() multiply by."""
    assert config.clip is not None
    return float(torch.tensor(config.clip / _QMAX[config.quant], dtype=torch.float32))


def _quantize(
    values: torch.Tensor, config: CodecConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q int8 in [-qmax, qmax] (kept,), per-chunk fp32 scales or None with a shared clip)."""
    qmax = _QMAX[config.quant]
    n = values.numel()
    scales: torch.Tensor | None
    if config.clip is not None:
        scaled = values.clamp(-config.clip, config.clip) / torch.tensor(_shared_scale(config))
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


def _dequantize(q: torch.Tensor, scales: torch.Tensor | None, config: CodecConfig) -> torch.Tensor:
    n = q.numel()
    if scales is None:
        return q.to(torch.float32) * torch.tensor(_shared_scale(config), dtype=torch.float32)
    pad = (-n) % config.chunk
    chunks = torch.cat([q.to(torch.float32), torch.zeros(pad)]).view(
        -1, config.chunk
    )  # (n_chunks, chunk)
    return (chunks * scales.view(-1, 1)).flatten()[:n]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    nibbles = q.to(torch.int64) & 0xF  # two's complement nibble; -8 never occurs
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


# ---------------------------------------------------------------- encode


def encode(
    tensors: Mapping[str, torch.Tensor],
    config: CodecConfig,
    *,
    seed: int,
    generator: torch.Generator | None = None,
) -> bytes:
    """The wire payload of an update; `seed` is the round's shared seed (randk coordinates),
    `generator` the member's own randomness for stochastic rounding."""
    entries: list[dict[str, Any]] = []
    sections: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r}: only named floating-point tensors can be encoded")
        flat = tensor.detach().to(torch.float32).reshape(-1).cpu()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"tensor {name!r}: has NaN/Inf values")
        numel = flat.numel()
        index_bytes = b""
        if config.sparsify == "topk":
            k = kept_count(numel, config.density)
            indices = torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
            gaps = torch.diff(indices, prepend=indices.new_zeros(1))  # first: the index itself
            index_bytes = _varint_encode(gaps)
        else:
            indices_or_none = _kept_indices(name, numel, config, seed)
            indices = torch.arange(numel) if indices_or_none is None else indices_or_none
        kept = flat[indices]
        if config.quant in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[config.quant]
            # saturate instead of overflowing to inf (fp16 tops out at 65504); error feedback keeps the rest
            limit = torch.finfo(dtype).max
            body = _to_bytes(kept.clamp(-limit, limit).to(dtype))
        else:
            q, scales = _quantize(kept, config, generator)
            packed = q if config.quant == "int8" else _pack_int4(q)
            body = (b"" if scales is None else _to_bytes(scales)) + _to_bytes(packed)
        section = index_bytes + body
        entries.append(
            {
                "name": name,
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "kept": int(indices.numel()),
                "offset": offset,
                "length": len(section),
                "index_bytes": len(index_bytes),
            }
        )
        sections.append(section)
        offset += len(section)
    header = _canonical(
        {"codec": str(config), "chunk": config.chunk, "clip": config.clip, "tensors": entries}
    )
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"update header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PRELUDE.pack(MAGIC, VERSION, len(header)) + header + b"".join(sections)


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(
        header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


# ---------------------------------------------------------------- decode


@dataclass(frozen=True)
class _Section:
    """One tensor's checked section, not yet dequantized."""

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor | None  # kept coordinates into the flat tensor; None: all, in order
    floats: torch.Tensor | None  # fp32 kept values (fp32/fp16/bf16 encodings)
    ints: torch.Tensor | None  # int8 values in [-qmax, qmax] (int8/int4 encodings)
    scales: torch.Tensor | None  # per-chunk fp32 scales; None with a shared clip


@dataclass(frozen=True)
class _Reject:
    member: str

    def __call__(self, why: str, tensor: str | None = None) -> UpdateRejected:
        where = f"member {self.member!r}: " + ("" if tensor is None else f"tensor {tensor!r}: ")
        return UpdateRejected((where + why).replace("\n", " ").replace("\r", " "))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in header object")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"header has {name}")


def _parse_header(payload: bytes, reject: _Reject) -> tuple[dict[str, Any], int]:
    """(header object, body start); checks the prelude, bounds and canonical JSON."""
    if len(payload) < _PRELUDE.size:
        raise reject(
            f"payload of {len(payload)} bytes is shorter than the {_PRELUDE.size}-byte prelude"
        )
    magic, version, header_len = _PRELUDE.unpack_from(payload)
    if magic != MAGIC:
        raise reject(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise reject(f"unknown codec version {version}, this server reads version {VERSION}")
    if header_len > min(MAX_HEADER_BYTES, len(payload) - _PRELUDE.size):
        raise reject(f"header length {header_len} exceeds the payload or {MAX_HEADER_BYTES} bytes")
    raw = payload[_PRELUDE.size : _PRELUDE.size + header_len]
    try:
        header = json.loads(
            raw.decode("ascii"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
        )
        canonical = _canonical(header) == raw
    except (ValueError, RecursionError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise reject(f"header is not valid JSON: {str(err)[:120]}") from None
    if not canonical:
        raise reject("header is not canonical JSON (sorted keys, no spaces)")
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise reject(f"header must be an object with keys {sorted(_HEADER_KEYS)}")
    return header, _PRELUDE.size + header_len


def _header_config(
    header: Mapping[str, Any], config: CodecConfig | None, reject: _Reject
) -> CodecConfig:
    codec, chunk, clip = header["codec"], header["chunk"], header["clip"]
    if (
        not isinstance(codec, str)
        or not _is_int(chunk)
        or not (clip is None or isinstance(clip, float))
    ):
        raise reject("header codec/chunk/clip must be a string, an integer and a number or null")
    try:
        found = CodecConfig.parse(codec, chunk=chunk, clip=clip)
    except ValueError as err:
        raise reject(str(err)) from None
    if codec != str(found):
        raise reject(f"codec {codec!r} is not written canonically as {str(found)!r}")
    if config is not None and found != config:
        raise reject(
            f"payload uses codec {found} (chunk {found.chunk}, clip {found.clip}), "
            f"the round uses {config} (chunk {config.chunk}, clip {config.clip})"
        )
    return found


def _parse(
    payload: bytes,
    expected: Mapping[str, tuple[int, ...]],
    member: str,
    max_bytes: int,
    seed: int | None,
    config: CodecConfig | None,
) -> tuple[CodecConfig, list[_Section]]:
    reject = _Reject(member)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise reject(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > max_bytes:  # before anything else: nothing of an oversized payload is read
        raise reject(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    payload = bytes(payload)
    header, body_start = _parse_header(payload, reject)
    codec = _header_config(header, config, reject)
    if codec.sparsify == "randk" and seed is None:
        raise reject(f"codec {codec} needs the round seed to rebuild its coordinates")
    entries = header["tensors"]
    if not isinstance(entries, list) or len(entries) > len(expected):
        raise reject(f"header tensors must be a list of at most {len(expected)} entries")
    body_len = len(payload) - body_start
    sections: list[_Section] = []
    seen: set[str] = set()
    offset = 0
    previous = ""
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise reject(f"every tensor entry must be an object with keys {sorted(_ENTRY_KEYS)}")
        name = entry["name"]
        if not isinstance(name, str):
            raise reject("a tensor entry's name is not a string")
        if name not in expected:
            raise reject("not in the trainable state", name)
        if name in seen:
            raise reject("appears twice", name)
        if name < previous:
            raise reject("tensor entries are not in name order", name)
        seen.add(name)
        previous = name
        sections.append(
            _parse_entry(
                entry, name, expected[name], codec, seed, payload, body_start, offset, reject
            )
        )
        offset += entry["length"]
    if offset != body_len:
        raise reject(f"sections cover {offset} bytes of a {body_len}-byte body")
    return codec, sections


def _parse_entry(
    entry: Mapping[str, Any],
    name: str,
    shape: tuple[int, ...],
    codec: CodecConfig,
    seed: int | None,
    payload: bytes,
    body_start: int,
    offset: int,
    reject: _Reject,
) -> _Section:
    got_shape = entry["shape"]
    if (
        not isinstance(got_shape, list)
        or not all(_is_int(d) for d in got_shape)
        or tuple(got_shape) != tuple(shape)
    ):
        raise reject(f"has shape {got_shape!r}, expected {tuple(shape)}", name)
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in _ORIGINAL_DTYPES:
        raise reject(f"dtype {entry['dtype']!r} is not one of {sorted(_ORIGINAL_DTYPES)}", name)
    fields = {key: entry[key] for key in ("kept", "offset", "length", "index_bytes")}
    for key, value in fields.items():
        if not _is_int(value) or value < 0:
            raise reject(f"{key} {value!r} is not a non-negative integer", name)
    numel = math.prod(shape)
    kept = numel if codec.sparsify == "none" else kept_count(numel, codec.density)
    if fields["kept"] != kept:  # from the manifest, never from the header
        raise reject(f"{fields['kept']} values kept, {codec} keeps {kept} of {numel}", name)
    if fields["offset"] != offset:
        raise reject(
            f"section offset {fields['offset']}, expected {offset} (sections are back to back)",
            name,
        )
    index_bytes = fields["index_bytes"]
    if codec.sparsify == "topk":
        if not kept <= index_bytes <= _VARINT_MAX_BYTES * kept:
            raise reject(f"{index_bytes} index bytes cannot hold {kept} indices", name)
    elif index_bytes != 0:
        raise reject(f"{index_bytes} index bytes, {codec} sends no indices", name)
    scales_len, values_len = _scales_nbytes(kept, codec), _values_nbytes(kept, codec)
    if fields["length"] != index_bytes + scales_len + values_len:
        raise reject(
            f"section length {fields['length']}, {codec} implies {index_bytes + scales_len + values_len}",
            name,
        )
    start = body_start + offset
    if start + fields["length"] > len(payload):
        raise reject(
            f"section [{offset}, {offset + fields['length']}) runs past the end of the body", name
        )
    view = memoryview(payload)
    cursor = start

    def take(n: int) -> memoryview:
        nonlocal cursor
        cursor += n
        return view[cursor - n : cursor]

    indices: torch.Tensor | None
    if codec.sparsify == "topk" and kept:
        gaps = _varint_decode(take(index_bytes), kept)
        if isinstance(gaps, str):
            raise reject(gaps, name)
        if bool((gaps[1:] == 0).any()):
            raise reject("indices are not strictly increasing", name)
        # capping each gap at numel keeps the cumulative sum far from int64 overflow
        indices = torch.cumsum(gaps.clamp(max=numel), 0)
        out_of_range = int((indices >= numel).sum())
        if out_of_range:
            raise reject(f"{out_of_range} indices out of range [0, {numel})", name)
    elif codec.sparsify == "topk":
        indices = torch.empty(0, dtype=torch.int64)
    else:
        indices = _kept_indices(name, numel, codec, seed if seed is not None else 0)
    scales: torch.Tensor | None = None
    if scales_len:
        scales = _from_bytes(take(scales_len), torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise reject("scales must be finite and non-negative", name)
    raw = take(values_len)
    if codec.quant in _FLOAT_DTYPES:
        floats = _from_bytes(raw, _FLOAT_DTYPES[codec.quant]).to(torch.float32)
        if not bool(torch.isfinite(floats).all()):
            raise reject("has NaN/Inf values", name)
        return _Section(name, tuple(shape), indices, floats, None, None)
    if codec.quant == "int8":
        ints = _from_bytes(raw, torch.int8)
        if bool((ints == -128).any()):
            raise reject("int8 value -128 is outside [-127, 127]", name)
    else:
        packed = _from_bytes(raw, torch.uint8).to(torch.int64)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()  # (2 * len,)
        if bool((nibbles == 8).any()):
            raise reject("int4 value -8 is outside [-7, 7]", name)
        if nibbles.numel() > kept and int(nibbles[-1]) != 0:
            raise reject("int4 padding nibble is not zero", name)
        ints = torch.where(nibbles >= 8, nibbles - 16, nibbles)[:kept].to(torch.int8)
    return _Section(name, tuple(shape), indices, None, ints, scales)


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
    codec, sections = _parse(payload, expected, member, max_bytes, seed, config)
    out: dict[str, torch.Tensor] = {}
    for section in sections:
        if section.floats is not None:
            values = section.floats
        else:
            assert section.ints is not None
            values = _dequantize(section.ints, section.scales, codec)
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
    _, sections = _parse(payload, expected, member, max_bytes, seed, config)
    scale = _shared_scale(config)
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
    return _scatter(values, _kept_indices(name, numel, config, seed), shape)


def encoded_nbytes(shapes: Mapping[str, tuple[int, ...]], config: CodecConfig) -> int | None:
    """Body bytes an update of these shapes costs (header excluded); None for topk (varint indices)."""
    if config.sparsify == "topk":
        return None
    total = 0
    for shape in shapes.values():
        numel = math.prod(shape)
        kept = numel if config.sparsify == "none" else kept_count(numel, config.density)
        total += _scales_nbytes(kept, config) + _values_nbytes(kept, config)
    return total


# ---------------------------------------------------------------- error feedback


@dataclass
class ErrorFeedback:
    """Member-side memory of what compression dropped; the caller persists `residual` (safetensors).

    Each round sends encode(delta + residual) and keeps the difference to what the server will
    decode, so over rounds the sum of what was sent tracks the sum of the true deltas (this is
    what makes unscaled randk/topk and low-bit rounding converge). Tensors not in a round's
    delta keep their residual for the next round that sends them.
    """

    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    def compress(
        self,
        delta: Mapping[str, torch.Tensor],
        config: CodecConfig,
        *,
        seed: int,
        generator: torch.Generator | None = None,
    ) -> bytes:
        corrected: dict[str, torch.Tensor] = {}
        for name, tensor in delta.items():
            value = tensor.detach().to(torch.float32).cpu()
            previous = self.residual.get(name)
            # a residual of another shape belongs to a tensor that was resized: it no longer applies
            corrected[name] = (
                value if previous is None or previous.shape != value.shape else value + previous
            )
        payload = encode(corrected, config, seed=seed, generator=generator)
        shapes = {name: tuple(t.shape) for name, t in corrected.items()}
        sent = decode(
            payload, shapes, member="self", max_bytes=len(payload), seed=seed, config=config
        )
        for name, value in corrected.items():
            self.residual[name] = value - sent[name]
        return payload
