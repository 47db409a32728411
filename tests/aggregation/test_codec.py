from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregation.codec import (
    UpdateRejected,
    decode,
    decode_integers,
    dequantize_sum,
    encode,
    encoded_nbytes,
)
from aggregation.codec_config import CodecConfig
from aggregation.container import MAGIC
from aggregation.feedback import ErrorFeedback
from aggregation.sparsify import kept_count, randk_indices

BIG = 262_144
LIMIT = 1 << 24


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def roundtrip(
    tensors: dict[str, torch.Tensor], spec: str, seed: int = 7, **kw: float | None
) -> tuple[bytes, dict[str, torch.Tensor]]:
    config = CodecConfig.parse(spec, **kw)  # type: ignore[arg-type]
    payload = encode(tensors, config, seed=seed, generator=gen(1))
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return payload, decode(
        payload, shapes, member="acme", max_bytes=LIMIT, seed=seed, config=config
    )


def fp32_size(n: int) -> int:
    return len(encode({"w": torch.zeros(n)}, CodecConfig.parse("fp32"), seed=0))


def split(payload: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack_from("<I", payload, 5)
    return json.loads(payload[9 : 9 + length]), payload[9 + length :]


def join(header: dict[str, object], body: bytes, version: int = 1) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<BI", version, len(raw)) + raw + body


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "spec",
    ["fp32", "fp16", "bf16", "int8", "int4", "randk0.02+int8", "topk0.005+int8", "randk0.05+int4"],
)
def test_parse_and_str_are_inverse(spec: str) -> None:
    assert str(CodecConfig.parse(spec)) == spec
    assert CodecConfig.parse(str(CodecConfig.parse(spec))) == CodecConfig.parse(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "int3",
        "randk+int8",
        "randk0+int8",
        "randk1.5+int8",
        "topk0.1",
        "fp16+randk0.1",
        "randk0.1+int8x",
    ],
)
def test_bad_spec_is_a_clear_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="codec"):
        CodecConfig.parse(spec)


def test_clip_makes_int_codecs_secure_compatible_and_topk_never() -> None:
    assert CodecConfig.parse("randk0.02+int8", clip=0.1).secure_compatible
    assert CodecConfig.parse("int4", clip=0.1).secure_compatible
    assert not CodecConfig.parse("randk0.02+int8").secure_compatible
    assert not CodecConfig.parse("topk0.02+int8", clip=0.1).secure_compatible
    with pytest.raises(ValueError, match="clip"):
        CodecConfig.parse("fp16", clip=0.1)


# ---------------------------------------------------------------- dense round trips


def test_fp32_is_exact_and_fp16_bf16_within_their_precision() -> None:
    x = {"a": gaussian(64, 33), "b": gaussian(7, seed=1)}
    _, out = roundtrip(x, "fp32")
    assert all(torch.equal(out[k], x[k]) for k in x)
    for spec, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        _, out = roundtrip(x, spec)
        for k, value in x.items():
            assert out[k].dtype == torch.float32 and out[k].shape == value.shape
            assert bool(((out[k] - value).abs() <= rel * value.abs() + 1e-7).all())


def test_int8_error_is_within_one_step_of_its_chunk_and_about_one_percent() -> None:
    x = gaussian(BIG)
    _, out = roundtrip({"w": x}, "int8")
    chunks = x.view(-1, 256)
    step = chunks.abs().amax(dim=1, keepdim=True) / 127  # (n_chunks, 1)
    assert bool(((out["w"].view(-1, 256) - chunks).abs() <= step * (1 + 1e-6)).all())
    assert float((out["w"] - x).norm() / x.norm()) < 0.011  # measured 0.0099


def test_int4_error_is_within_one_step_of_its_chunk() -> None:
    x = gaussian(1000)  # not a multiple of the chunk, odd nibble count
    x = x[:999]
    payload, out = roundtrip({"w": x}, "int4", chunk=100)
    step = torch.cat([x, x.new_zeros(1)]).view(-1, 100).abs().amax(dim=1) / 7
    err = (out["w"] - x).abs()
    assert bool((err <= step.repeat_interleave(100)[:999] * (1 + 1e-6)).all())
    assert len(split(payload)[1]) == 500 + 10 * 4  # 999 nibbles + a zero pad nibble, 10 scales


def test_clip_clamps_to_the_shared_range() -> None:
    x = gaussian(4096) * 0.1
    x[0] = 5.0
    _, out = roundtrip({"w": x}, "int8", clip=0.25)
    assert float(out["w"].abs().max()) <= 0.25 + 1e-6
    assert float(out["w"][0]) == pytest.approx(0.25)


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not() -> None:
    step = 1.0 / 127
    x = torch.full((256,), 0.3 * step)
    x[0] = 1.0  # fixes the chunk's scale at exactly `step`
    config = CodecConfig.parse("int8")
    total = torch.zeros(256, dtype=torch.float64)
    draws = 400
    for i in range(draws):
        total += decode(
            encode({"w": x}, config, seed=0, generator=gen(i)),
            {"w": (256,)},
            member="m",
            max_bytes=LIMIT,
        )["w"]
    mean = (total / draws)[1:]
    # 255 * 400 Bernoulli(0.3) draws: the average sits within a few hundredths of a step
    assert float((mean.mean() - 0.3 * step).abs()) < 0.01 * step
    assert float((mean - 0.3 * step).abs().max()) < 0.12 * step  # each coordinate: ~5 sigma
    nearest = torch.round(x[1:] / step) * step
    assert float((nearest - x[1:]).abs().min()) == pytest.approx(0.3 * step)  # biased by 0.3 step


# ---------------------------------------------------------------- randk


def test_randk_indices_are_shared_by_seed_and_spread_uniformly() -> None:
    a = randk_indices("layers.0.lora_B", 100_000, 0.02, seed=42)
    b = randk_indices("layers.0.lora_B", 100_000, 0.02, seed=42)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert a.numel() == 2000 == torch.unique(a).numel() and bool((a[1:] > a[:-1]).all())
    assert not torch.equal(a, randk_indices("layers.0.lora_B", 100_000, 0.02, seed=43))
    assert not torch.equal(a, randk_indices("layers.1.lora_B", 100_000, 0.02, seed=42))
    counts = torch.bincount(a // 10_000, minlength=10)
    assert bool(((counts > 140) & (counts < 260)).all())  # 200 expected per tenth
    # the same coordinates over rounds would starve the rest: successive seeds overlap ~2%
    overlap = torch.isin(a, randk_indices("layers.0.lora_B", 100_000, 0.02, seed=43)).sum()
    assert int(overlap) < 100


def test_randk_puts_values_at_the_shared_coordinates_with_no_indices_on_the_wire() -> None:
    x = gaussian(100_000)
    payload, out = roundtrip({"w": x}, "randk0.02+int8", seed=5)
    idx = randk_indices("w", 100_000, 0.02, seed=5)
    mask = torch.zeros(100_000, dtype=torch.bool)
    mask[idx] = True
    assert bool((out["w"][~mask] == 0).all())
    step = x[idx].abs().max() / 127
    assert bool(((out["w"][idx] - x[idx]).abs() <= step).all())
    # k int8 values + 8 scales + a header: no index bytes
    assert len(payload) < 2000 + 8 * 4 + 300
    assert fp32_size(100_000) / len(payload) > 150  # measured ~172x


def test_randk_payload_decoded_with_another_seed_is_a_different_update() -> None:
    x = gaussian(10_000)
    config = CodecConfig.parse("randk0.05+fp32")
    payload = encode({"w": x}, config, seed=1)
    good = decode(payload, {"w": (10_000,)}, member="m", max_bytes=LIMIT, seed=1)["w"]
    other = decode(payload, {"w": (10_000,)}, member="m", max_bytes=LIMIT, seed=2)["w"]
    idx = randk_indices("w", 10_000, 0.05, seed=1)
    assert torch.equal(good[idx], x[idx]) and not torch.equal(good, other)
    with pytest.raises(UpdateRejected, match="member 'm': .*seed"):
        decode(payload, {"w": (10_000,)}, member="m", max_bytes=LIMIT)


# ---------------------------------------------------------------- topk


def test_topk_keeps_the_largest_coordinates_and_is_over_300x_smaller() -> None:
    x = gaussian(BIG)
    payload, out = roundtrip({"w": x}, "topk0.003+int8")
    k = kept_count(BIG, 0.003)
    top = torch.topk(x.abs(), k).indices
    assert torch.equal(torch.sort(torch.nonzero(out["w"]).flatten()).values, torch.sort(top).values)
    assert float((out["w"][top] - x[top]).abs().max()) <= float(x.abs().max()) / 127
    ratio = fp32_size(BIG) / len(payload)
    assert ratio > 400  # measured ~454x: 1 byte value + ~2 bytes varint gap per kept coordinate


def test_topk_round_trips_edge_indices_and_tiny_tensors() -> None:
    x = torch.zeros(300)
    x[0], x[299], x[150] = 3.0, -2.0, 1.0
    _, out = roundtrip({"w": x, "s": torch.tensor(0.5)}, "topk0.01+fp32")
    assert torch.equal(out["w"], x) and float(out["s"]) == 0.5


def test_encoded_sizes_match_the_prediction() -> None:
    shapes = {"a": (1000, 3), "b": (17,)}
    tensors = {n: gaussian(*s) for n, s in shapes.items()}
    for spec in ("fp16", "int8", "int4", "randk0.1+int4", "randk0.02+int8"):
        payload, _ = roundtrip(tensors, spec)
        _, body = split(payload)
        assert len(body) == encoded_nbytes(shapes, CodecConfig.parse(spec))


# ---------------------------------------------------------------- secure aggregation


@pytest.mark.parametrize("spec", ["randk0.05+int8", "int4", "randk0.1+int4", "int8"])
def test_integer_sum_times_shared_scale_equals_sum_of_decoded_updates(spec: str) -> None:
    config = CodecConfig.parse(spec, clip=0.05)
    shapes = {"b": (128, 16), "r": (33,)}
    payloads = [
        encode(
            {n: 0.02 * gaussian(*s, seed=m) for n, s in shapes.items()},
            config,
            seed=9,
            generator=gen(m),
        )
        for m in range(5)
    ]
    decoded = [
        decode(p, shapes, member=f"m{i}", max_bytes=LIMIT, seed=9, config=config)
        for i, p in enumerate(payloads)
    ]
    ints = [
        decode_integers(p, shapes, member=f"m{i}", max_bytes=LIMIT, seed=9, config=config)
        for i, p in enumerate(payloads)
    ]
    qmax = 127 if spec.endswith("int8") else 7
    for name, shape in shapes.items():
        scale = ints[0][name][1]
        assert all(member[name][1] == scale for member in ints)  # one scale for everyone
        assert scale == pytest.approx(0.05 / qmax)
        vectors = [member[name][0] for member in ints]
        assert all(v.dtype == torch.int64 and int(v.abs().max()) <= qmax for v in vectors)
        for vector, member in zip(vectors, decoded, strict=True):
            # each member's decoded tensor is exactly its integers times the shared scale
            one = dequantize_sum(name, vector, scale, shape, config, seed=9)
            assert torch.equal(one, member[name])
        summed = dequantize_sum(name, torch.stack(vectors).sum(0), scale, shape, config, seed=9)
        expected = torch.stack([d[name] for d in decoded]).to(torch.float64).sum(0)
        # the sum of the integers is exact; only the five fp32 roundings of decode() differ
        torch.testing.assert_close(
            summed.to(torch.float64), expected, rtol=0, atol=5 * 0.05 * 2**-24
        )


def test_decode_integers_refuses_codecs_without_shared_scale() -> None:
    with pytest.raises(ValueError, match="shared"):
        decode_integers(
            b"", {}, member="m", max_bytes=10, seed=0, config=CodecConfig.parse("randk0.1+int8")
        )


# ---------------------------------------------------------------- error feedback


def test_error_feedback_makes_the_sum_of_sent_updates_track_the_true_sum() -> None:
    config = CodecConfig.parse("randk0.05+int8")
    rounds, n = 200, 4096
    base = gaussian(n, seed=100)
    feedback = ErrorFeedback(residual={})
    true_sum, ef_sum, plain_sum = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    gaps = {}
    for r in range(rounds):
        delta = {"w": base + 0.5 * gaussian(n, seed=r)}  # a consistent direction plus noise
        true_sum += delta["w"]
        sent = feedback.compress(delta, config, seed=r, generator=gen(r))
        ef_sum += decode(sent, {"w": (n,)}, member="m", max_bytes=LIMIT, seed=r, config=config)["w"]
        plain = encode(delta, config, seed=r, generator=gen(r))
        plain_sum += decode(plain, {"w": (n,)}, member="m", max_bytes=LIMIT, seed=r, config=config)[
            "w"
        ]
        if r + 1 in (20, rounds):
            gaps[r + 1] = float((ef_sum - true_sum).norm() / true_sum.norm())
    assert bool(torch.isfinite(feedback.residual["w"]).all())
    torch.testing.assert_close(ef_sum + feedback.residual["w"], true_sum, rtol=1e-4, atol=1e-3)
    assert gaps[rounds] < 0.2 and gaps[rounds] < gaps[20] / 4  # shrinks ~1/rounds
    assert float((plain_sum - true_sum).norm() / true_sum.norm()) > 0.9  # only 5% ever arrives


# ---------------------------------------------------------------- refusals


SHAPES = {"x.lora_B": (8, 8), "y": (10,)}


def valid(spec: str = "topk0.25+int8", **kw: float | None) -> bytes:
    config = CodecConfig.parse(spec, **kw)  # type: ignore[arg-type]
    return encode({n: gaussian(*s) for n, s in SHAPES.items()}, config, seed=3, generator=gen(0))


def edit_entry(payload: bytes, tensor: str, **changes: object) -> bytes:
    header, body = split(payload)
    tensors = header["tensors"]
    assert isinstance(tensors, list)
    for entry in tensors:
        if entry["name"] == tensor:
            entry.update(changes)
    return join(header, body)


def edit_body(payload: bytes, name: str, edit: Callable[[bytearray, int, int], None]) -> bytes:
    header, body = split(payload)
    tensors = header["tensors"]
    assert isinstance(tensors, list)
    entry = next(e for e in tensors if e["name"] == name)
    mutable = bytearray(body)
    edit(mutable, entry["offset"], entry["index_bytes"])
    return join(header, bytes(mutable))


def topk_with_indices(indices: list[int]) -> bytes:
    """A topk0.25+fp32 payload for 'x.lora_B' whose 16 indices are given (plain varint gaps)."""
    gaps = [indices[0]] + [b - a for a, b in itertools.pairwise(indices)]
    varints = b"".join(_leb(g) for g in gaps)
    values = struct.pack("<16f", *([1.0] * 16))
    header = {
        "chunk": 256,
        "clip": None,
        "codec": "topk0.25+fp32",
        "tensors": [
            {
                "dtype": "float32",
                "index_bytes": len(varints),
                "kept": 16,
                "length": len(varints) + 64,
                "name": "x.lora_B",
                "offset": 0,
                "shape": [8, 8],
            }
        ],
    }
    return join(header, varints + values)


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def set_scale(body: bytearray, offset: int, index_bytes: int, value: float = math.nan) -> None:
    body[offset + index_bytes : offset + index_bytes + 4] = struct.pack("<f", value)


def _duplicate() -> bytes:
    header, body = split(encode({"y": gaussian(10)}, CodecConfig.parse(TOPK), seed=0))
    tensors = header["tensors"]
    assert isinstance(tensors, list)
    last = tensors[-1]
    tensors.append(dict(last, offset=len(body)))
    return join(header, body + body[last["offset"] :])


def _last_bytes(spec: str, tail: bytes) -> bytes:
    payload = encode({"y": gaussian(10)}, CodecConfig.parse(spec), seed=0)
    return payload[: -len(tail)] + tail


def _raw_header(raw: bytes) -> bytes:
    return MAGIC + struct.pack("<BI", 1, len(raw)) + raw


TOPK = "topk0.25+int8"
# case -> (payload, message pattern, the round's codec or None for "any")
BAD: dict[str, tuple[Callable[[], bytes], str, str | None]] = {
    "too big": (lambda: valid() + b"\0" * (1 << 20), "exceeds the limit", TOPK),
    "short": (lambda: MAGIC, "shorter", TOPK),
    "magic": (lambda: b"XXXX" + valid()[4:], "bad magic", TOPK),
    "version": (lambda: valid()[:4] + b"\x02" + valid()[5:], "unknown codec version 2", TOPK),
    "header length": (
        lambda: valid()[:5] + struct.pack("<I", 1 << 30) + valid()[9:],
        "header length",
        TOPK,
    ),
    "not json": (lambda: _raw_header(b"{x}"), "not valid JSON", TOPK),
    "nan in json": (lambda: _raw_header(b'{"clip":NaN}'), "not valid JSON", TOPK),
    "duplicate key": (lambda: _raw_header(b'{"a":1,"a":2}'), "not valid JSON", TOPK),
    "deep json": (lambda: _raw_header(b"[" * 100_000 + b"]" * 100_000), "not valid JSON", None),
    "not canonical": (
        lambda: _raw_header(b'{"tensors": [], "codec": "int8"}'),
        "not canonical",
        TOPK,
    ),
    "structure": (lambda: join({"codec": "int8"}, b""), "keys", TOPK),
    "unknown codec": (
        lambda: join({"codec": "int3", "chunk": 256, "clip": None, "tensors": []}, b""),
        "codec 'int3'",
        None,
    ),
    "unknown name": (
        lambda: edit_entry(valid(), "y", name="z"),
        "tensor 'z': not in the trainable state",
        TOPK,
    ),
    "duplicate": (_duplicate, "tensor 'y': appears twice", TOPK),
    "shape": (
        lambda: edit_entry(valid(), "y", shape=[5, 2]),
        "tensor 'y': has shape \\[5, 2\\], expected \\(10,\\)",
        TOPK,
    ),
    "kept": (lambda: edit_entry(valid(), "y", kept=10), "tensor 'y': 10 values kept", TOPK),
    "offset": (lambda: edit_entry(valid(), "y", offset=1), "tensor 'y': section offset", TOPK),
    "length": (
        lambda: edit_entry(valid(), "y", length=1 << 40),
        "tensor 'y': section length",
        TOPK,
    ),
    "negative": (
        lambda: edit_entry(valid(), "y", index_bytes=-1),
        "tensor 'y': index_bytes -1",
        TOPK,
    ),
    "index bytes": (
        lambda: edit_entry(valid(), "y", index_bytes=1000),
        "tensor 'y': 1000 index bytes",
        TOPK,
    ),
    "truncated": (lambda: valid()[:-1], "runs past the end|cover", TOPK),
    "trailing": (lambda: valid() + b"\0", "sections cover", TOPK),
    "codec mismatch": (
        lambda: valid("int8"),
        "payload uses codec int8 .*the round uses topk0.25\\+int8",
        TOPK,
    ),
    "clip mismatch": (lambda: valid("int8", clip=0.5), "clip 0.5", "int8"),
    "out of range": (
        lambda: topk_with_indices(list(range(57, 73))),
        "tensor 'x.lora_B': 9 indices out of range \\[0, 64\\)",
        None,
    ),
    "not increasing": (
        lambda: topk_with_indices([0, 1, 2, 2, *range(4, 16)]),
        "tensor 'x.lora_B': indices are not strictly increasing",
        None,
    ),
    "nan scale": (
        lambda: edit_body(valid(), "y", set_scale),
        "tensor 'y': scales must be finite",
        TOPK,
    ),
    "negative scale": (
        lambda: edit_body(valid(), "y", lambda b, o, i: set_scale(b, o, i, -1.0)),
        "tensor 'y': scales must be finite and non-negative",
        TOPK,
    ),
    "huge scale": (
        lambda: edit_body(valid(), "y", lambda b, o, i: set_scale(b, o, i, 3e38)),
        "tensor 'y': dequantized values overflow",
        TOPK,
    ),
    "inf float": (
        lambda: _last_bytes("fp16", struct.pack("<e", math.inf)),
        "tensor 'y': has NaN/Inf",
        "fp16",
    ),
    "int8 -128": (lambda: _last_bytes("int8", b"\x80"), "tensor 'y': int8 value -128", "int8"),
    "int4 -8": (lambda: _last_bytes("int4", b"\x08"), "tensor 'y': int4 value -8", "int4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_refusal_is_one_line_naming_the_member(case: str) -> None:
    make, pattern, spec = BAD[case]
    config = None if spec is None else CodecConfig.parse(spec)
    with pytest.raises(UpdateRejected) as info:
        decode(make(), SHAPES, member="acme", max_bytes=1 << 20, seed=3, config=config)
    text = str(info.value)
    assert text.startswith("member 'acme': ") and "\n" not in text
    assert re.search(pattern, text), text


def test_oversized_payload_is_refused_before_it_is_read() -> None:
    class Poisoned(bytes):
        def __getitem__(self, key: object) -> bytes:  # any read would fail loudly
            raise AssertionError("read")

    with pytest.raises(UpdateRejected, match="exceeds the limit of 100"):
        decode(Poisoned(b"\0" * 101), SHAPES, member="acme", max_bytes=100)


def test_a_payload_may_carry_a_subset_of_the_manifest() -> None:
    payload = encode({"y": gaussian(10)}, CodecConfig.parse("fp32"), seed=0)
    out = decode(payload, SHAPES, member="acme", max_bytes=4096)
    assert list(out) == ["y"] and torch.equal(out["y"], gaussian(10))


# ---------------------------------------------------------------- properties

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "randk0.3+int8",
    "randk0.2+int4",
    "topk0.25+int8",
    "topk0.3+bf16",
]


def check_decodes_or_rejects(payload: bytes, config: CodecConfig | None = None) -> None:
    try:
        out = decode(payload, SHAPES, member="acme", max_bytes=4096, seed=3, config=config)
    except UpdateRejected as err:
        assert str(err).startswith("member 'acme': ") and "\n" not in str(err)
        return
    for name, tensor in out.items():
        assert tuple(tensor.shape) == SHAPES[name] and tensor.dtype == torch.float32
        assert bool(torch.isfinite(tensor).all())


@PROPERTY
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_are_only_ever_rejected(data: bytes, with_prelude: bool) -> None:
    if with_prelude:
        data = MAGIC + struct.pack("<BI", 1, min(len(data), 300)) + data
    check_decodes_or_rejects(data)


@PROPERTY
@given(
    st.sampled_from(SPECS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-1, 10_000),
    st.binary(max_size=20),
)
def test_mutated_bytes_decode_to_the_manifest_or_are_rejected(
    spec: str, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    payload = bytearray(valid(spec))
    for position, value in flips:
        payload[position % len(payload)] = value
    data = bytes(payload)
    if cut >= 0:
        data = data[: cut % (len(data) + 1)]
    check_decodes_or_rejects(data + extra)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(-3, 100), max_size=4),
)


@PROPERTY
@given(
    st.sampled_from(SPECS),
    st.sampled_from(["name", "shape", "dtype", "kept", "offset", "length", "index_bytes"]),
    st.integers(0, 1),
    JSON_VALUES,
    st.sampled_from([None, "codec", "chunk", "clip"]),
    JSON_VALUES,
    st.integers(0, 3),
)
def test_edited_header_fields_decode_to_the_manifest_or_are_rejected(
    spec: str, key: str, which: int, value: object, top: str | None, top_value: object, version: int
) -> None:
    header, body = split(valid(spec))
    tensors = header["tensors"]
    assert isinstance(tensors, list)
    tensors[which][key] = value
    if top is not None:
        header[top] = top_value
    check_decodes_or_rejects(join(header, body, version=version))
    check_decodes_or_rejects(join(header, body), CodecConfig.parse(spec))


@PROPERTY
@given(st.sampled_from(SPECS), st.integers(1, 200))
def test_anything_over_max_bytes_is_refused_first(spec: str, over: int) -> None:
    payload = valid(spec)
    with pytest.raises(UpdateRejected, match="exceeds the limit"):
        decode(payload, SHAPES, member="acme", max_bytes=len(payload) - over, seed=3)
    decode(payload, SHAPES, member="acme", max_bytes=len(payload), seed=3)
