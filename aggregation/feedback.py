"""Error feedback: the member-side memory carrying what compression dropped into later rounds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from aggregation.codec import decode, encode
from aggregation.codec_config import CodecConfig


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
