"""The FMC1 container: how an update's header and sections are laid out, and read back strictly.

    b"FMC1" | u8 version (=1) | u32 header length (little-endian) | header | body

The header is canonical JSON (sorted keys, no whitespace): the codec string, the chunk size,
the shared clip (or null) and one entry per tensor, in name order, with its shape, original
dtype, number of kept values and the offset/length of its section in the body. Sections are
laid out back to back; each is [topk indices][per-chunk fp32 scales][values].

Reading is strict and bounded: the size limit is checked before anything else, every header
field is type- and range-checked against the model's manifest (`expected`) before any size it
implies is allocated, sections must tile the body exactly, and every refusal is one exception
built by the caller's `reject` (aggregation/codec.py: UpdateRejected naming the member and the
tensor). Allocation is at most a few times the payload plus the dense tensors of the manifest
entries the payload names.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from aggregation.codec_config import CodecConfig
from aggregation.quantize import scales_from, scales_nbytes, values_from, values_nbytes
from aggregation.sparsify import VARINT_MAX_BYTES, kept_count, kept_indices, topk_indices_from

MAGIC = b"FMC1"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
_PRELUDE = struct.Struct("<4sBI")  # magic, version, header length

_ORIGINAL_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_ENTRY_KEYS = {"name", "shape", "dtype", "kept", "offset", "length", "index_bytes"}
_HEADER_KEYS = {"codec", "chunk", "clip", "tensors"}


class Reject(Protocol):
    """Builds the exception a refusal raises: one line naming the member (and the tensor)."""

    def __call__(self, why: str, tensor: str | None = None) -> Exception: ...


# ---------------------------------------------------------------- write


@dataclass(frozen=True)
class Written:
    """One tensor's encoded section, as encode() hands it to write()."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the tensor's original dtype, recorded in the header
    kept: int
    index_bytes: bytes  # topk's varint gaps; empty otherwise
    values: bytes  # [per-chunk scales][values]


def write(config: CodecConfig, sections: Sequence[Written]) -> bytes:
    """The payload: prelude, canonical header and the sections back to back, in the given order."""
    entries: list[dict[str, Any]] = []
    offset = 0
    for section in sections:
        length = len(section.index_bytes) + len(section.values)
        entries.append(
            {
                "name": section.name,
                "shape": list(section.shape),
                "dtype": str(section.dtype).removeprefix("torch."),
                "kept": section.kept,
                "offset": offset,
                "length": length,
                "index_bytes": len(section.index_bytes),
            }
        )
        offset += length
    header = _canonical(
        {"codec": str(config), "chunk": config.chunk, "clip": config.clip, "tensors": entries}
    )
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"update header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    body = b"".join(s.index_bytes + s.values for s in sections)
    return _PRELUDE.pack(MAGIC, VERSION, len(header)) + header + body


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(
        header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


# ---------------------------------------------------------------- read


@dataclass(frozen=True)
class Section:
    """One tensor's checked section, not yet dequantized."""

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor | None  # kept coordinates into the flat tensor; None: all, in order
    floats: torch.Tensor | None  # fp32 kept values (fp32/fp16/bf16 encodings)
    ints: torch.Tensor | None  # int8 values in [-qmax, qmax] (int8/int4 encodings)
    scales: torch.Tensor | None  # per-chunk fp32 scales; None with a shared clip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in header object")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"header has {name}")


def _parse_header(payload: bytes, reject: Reject) -> tuple[dict[str, Any], int]:
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
    header: Mapping[str, Any], config: CodecConfig | None, reject: Reject
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


def parse(
    payload: bytes,
    expected: Mapping[str, tuple[int, ...]],
    max_bytes: int,
    seed: int | None,
    config: CodecConfig | None,
    reject: Reject,
) -> tuple[CodecConfig, list[Section]]:
    """The payload's codec and its checked sections, in name order; raises reject(...) else."""
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
    sections: list[Section] = []
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
    reject: Reject,
) -> Section:
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
        if not kept <= index_bytes <= VARINT_MAX_BYTES * kept:
            raise reject(f"{index_bytes} index bytes cannot hold {kept} indices", name)
    elif index_bytes != 0:
        raise reject(f"{index_bytes} index bytes, {codec} sends no indices", name)
    scales_len, values_len = scales_nbytes(kept, codec), values_nbytes(kept, codec)
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
    if codec.sparsify == "topk":
        found = topk_indices_from(take(index_bytes), kept, numel)
        if isinstance(found, str):
            raise reject(found, name)
        indices = found
    else:
        indices = kept_indices(name, numel, codec, seed if seed is not None else 0)
    scales = scales_from(take(scales_len)) if scales_len else None
    if isinstance(scales, str):
        raise reject(scales, name)
    values = values_from(take(values_len), kept, codec)
    if isinstance(values, str):
        raise reject(values, name)
    if values.is_floating_point():
        return Section(name, tuple(shape), indices, values, None, None)
    return Section(name, tuple(shape), indices, None, values, scales)
