"""The operator's yardstick: held-out validation sets per domain and the loss on each."""

from __future__ import annotations

import torch

from model.base import Base
from model.member_data import read_texts
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
    return evaluate_with_head(lora, sets, config, 0)[0]


def evaluate_with_head(
    lora: LoraMoE, sets: dict[str, torch.Tensor], config: RunConfig, head_batches: int
) -> tuple[dict[str, float], float | None]:
    """(validation loss per domain, the mean over domains of the loss on each set's first
    `head_batches` batches). The head is what contribution scoring values coalitions on (the
    round's contribution sets), so the next round's scoring starts from this model's head loss
    instead of evaluating it again. head_batches 0: no head (None)."""
    precision = select_precision(config.precision)
    lora.model.to(precision.device)
    head_rows = head_batches * config.batch_size
    losses, heads = {}, []
    with lora.merged() as model:

        def loss(blocks: torch.Tensor) -> float:
            return evaluate_loss(model, blocks, batch_size=config.batch_size, device=precision.device,
                                 autocast_dtype=precision.autocast_dtype)

        for domain, blocks in sets.items():
            if 0 < head_rows < blocks.shape[0]:  # the full loss from the head's and the rest's, by tokens
                head, rest = blocks[:head_rows], blocks[head_rows:]
                heads.append(loss(head))
                losses[domain] = (heads[-1] * head[:, 1:].numel() + loss(rest) * rest[:, 1:].numel()) / blocks[:, 1:].numel()
            else:
                losses[domain] = loss(blocks)
                heads.append(losses[domain])
    lora.model.to("cpu")
    return losses, (sum(heads) / len(heads) if head_rows and heads else None)
