"""What the node caches in its state dir, read back so that a damaged cache is rebuilt, never fatal.

A cache is anything the node can make again from what it holds or is sent: the token cache
(from the member's data), the error-feedback residual (starting from zero costs one round of
compression accuracy, nothing else), the view of the global state (the server resends it in
full: client/node.py StaleView), the daemon's metrics (counters restart). Each reader returns
None for a file that does not parse or holds the wrong thing, after one warning line naming it;
the caller rebuilds and overwrites it.

Not caches, and never rebuilt here: the identity key (registered in the consortium's roster; a
new one would not be this member, privacy/roster.py) and the secure-aggregation records
(client/secure.py: forgetting them would let a server replay a session or unmask an update
twice, so a damaged one refuses secure aggregation with one line naming it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.io import load_tensors

log = logging.getLogger("fedmoe.client")


def warn_rebuilt(path: Path, what: str, reason: str, then: str) -> None:
    """The one line a damaged cache costs: which file, why, and what happens instead."""
    log.warning("%s: %s unreadable (%s); %s", path, what, reason, then)


def _tensors(path: Path, what: str, then: str) -> dict[str, torch.Tensor] | None:
    try:
        return load_tensors(path)
    except (OSError, ValueError) as exc:
        warn_rebuilt(path, what, str(exc).removeprefix(f"{path}: "), then)
        return None


def read_token_cache(path: Path, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(blocks, labels) from the token cache, or None (warned) when it must be rebuilt."""
    then = "rebuilding it from the member's data"
    cached = _tensors(path, "token cache", then)
    if cached is None:
        return None
    blocks, labels = cached.get("blocks"), cached.get("labels")
    if blocks is None or labels is None:
        problem = "no 'blocks' and 'labels' tensors"
    elif blocks.dim() != 2 or blocks.shape[1] != seq_len or blocks.dtype != torch.int64:
        problem = f"blocks are {blocks.dtype} {tuple(blocks.shape)}, expected int64 (N, {seq_len})"
    elif labels.shape != blocks.shape or labels.dtype != torch.int64:
        problem = f"labels are {labels.dtype} {tuple(labels.shape)}, expected those of the blocks"
    else:
        return blocks, labels
    warn_rebuilt(path, "token cache", problem, then)
    return None


def read_residual(path: Path) -> dict[str, torch.Tensor] | None:
    """The error-feedback residual, or None (warned): the member then starts from zero residual."""
    then = "starting error feedback from zero"
    residual = _tensors(path, "error-feedback residual", then)
    if residual is None:
        return None
    bad = sorted(name for name, t in residual.items() if not t.is_floating_point() or not torch.isfinite(t).all())
    if bad:
        warn_rebuilt(path, "error-feedback residual", f"tensor {bad[0]!r} is not finite floating point", then)
        return None
    return residual


def read_view(path: Path) -> dict[str, torch.Tensor] | None:
    """The held view of the global state, or None (warned): the server then resends it in full."""
    return _tensors(path, "held view", "asking the server for the full view")
