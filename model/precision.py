"""Mixed precision chosen from the device: bf16 autocast where supported, fp16 + GradScaler
on CUDA GPUs without bf16, fp32 when asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHOICES = ("auto", "bf16", "fp16", "fp32")


class PrecisionError(ValueError):
    """The requested precision cannot run on this device."""


@dataclass(frozen=True)
class Precision:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's exponent range and does not

    @property
    def name(self) -> str:
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
        return f"{names[self.autocast_dtype]}{'+GradScaler' if self.grad_scaler else ''} on {self.device.type}"

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.grad_scaler)


def select_precision(
    requested: str = "auto",
    device: str = "auto",
    *,
    cuda_available: bool | None = None,
    cuda_bf16: bool | None = None,
) -> Precision:
    """Pick device and autocast dtype. `cuda_*` override detection (tests of the selection)."""
    if requested not in CHOICES:
        raise PrecisionError(f"precision {requested!r} is not one of {', '.join(CHOICES)}")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not has_cuda:
        raise PrecisionError(f"device {device!r} requested but CUDA is not available")
    bf16_ok = True
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    if requested == "fp32":
        return Precision(dev, None, False)
    if requested == "fp16":
        if dev.type != "cuda":
            raise PrecisionError("precision 'fp16' needs a CUDA device (CPU autocast uses bf16)")
        return Precision(dev, torch.float16, True)
    if requested == "bf16":
        if not bf16_ok:
            raise PrecisionError(f"precision 'bf16' is not supported on {device}; use 'fp16' or 'auto'")
        return Precision(dev, torch.bfloat16, False)
    # auto
    if bf16_ok:
        return Precision(dev, torch.bfloat16, False)
    return Precision(dev, torch.float16, True)
