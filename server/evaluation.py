"""The operator's yardstick: held-out validation sets per domain and the loss on each."""

from __future__ import annotations

import torch

from model.base import Base
from model.corpus import read_texts
from model.lora import LoraMoE
from model.moe import evaluate_loss
from model.precision import select_precision
from model.tokenizer import pack
from server.config import RunConfig
from server.workspace import Workspace


def validation_sets(ws: Workspace, base: Base, config: RunConfig) -> dict[str, torch.Tensor]:
    """The operator's held-out validation blocks per domain (capped to eval-batches batches)."""
    cap = config.eval_batches * config.batch_size * config.seq_len
    sets = {}
    for domain in ws.validation_domains():
        path = ws.validation_dir / f"{domain}.jsonl"
        sets[domain] = pack(base.tokenizer, read_texts(path), config.seq_len, cap + 1, source=str(path))
    if not sets:
        raise FileNotFoundError(f"{ws.validation_dir}: no validation sets (run `fedmoe init`)")
    return sets


def evaluate(lora: LoraMoE, sets: dict[str, torch.Tensor], config: RunConfig) -> dict[str, float]:
    """Validation loss per domain of the model as it stands (on the configured device)."""
    precision = select_precision(config.precision)
    model = lora.model.to(precision.device)
    losses = {
        domain: evaluate_loss(
            model, blocks, batch_size=config.batch_size, device=precision.device,
            autocast_dtype=precision.autocast_dtype,
        )
        for domain, blocks in sets.items()
    }
    model.to("cpu")
    return losses
