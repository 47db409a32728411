"""The operator's brief pre-training of the embedded tiny base on the general mixture.

A plain loop (full-parameter AdamW, cosine decay, mixed precision). Real operators skip it and
bring a pre-trained HF MoE checkpoint instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from model.precision import Precision
from model.tokenizer import batches


def pretrain(
    model: PreTrainedModel,
    blocks: torch.Tensor,  # (N, T)
    *,
    steps: int,
    batch_size: int,
    lr: float,
    precision: Precision,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train all parameters for `steps` steps; returns the mean loss of the last 10% of steps."""
    torch.manual_seed(seed)
    model.to(precision.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    scaler = precision.make_scaler()
    stream = batches(blocks, batch_size, seed=seed)
    tail: list[float] = []
    for step in range(steps):
        batch = next(stream).to(precision.device)  # (B, T)
        with torch.autocast(
            precision.device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None
        ):
            loss = model(input_ids=batch, labels=batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, float(loss.detach()))
    model.to("cpu").eval()
    return sum(tail) / len(tail)
