"""Codec spec: which encoding a round's updates use, parsed from strings like "randk0.02+int8".

Encodings compose as `[randk<d>+|topk<d>+]<quant>`: an optional sparsifier keeping a fraction d
of the coordinates (aggregation/sparsify.py) and a value encoding (aggregation/quantize.py);
`chunk` and `clip` tune int8/int4. CodecConfig validates every field on construction, so a
config that exists is one the codec (aggregation/codec.py) can write and read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

QUANTS = ("fp32", "fp16", "bf16", "int8", "int4")
SPARSIFIERS = ("none", "randk", "topk")
QMAX = {"int8": 127, "int4": 7}  # the integer encodings and their largest magnitude
_MAX_CHUNK = 1 << 20
_SPEC = re.compile(r"(?:(randk|topk)(\d+(?:\.\d*)?(?:e-?\d+)?)\+)?(fp32|fp16|bf16|int8|int4)")


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
            if self.quant not in QMAX:
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
        return self.sparsify != "topk" and self.quant in QMAX and self.clip is not None
