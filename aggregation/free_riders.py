"""Free-rider detectors: updates that carry no training, and members whose updates are copies.

Pure helpers over update tensors, open mode only (secure mode never sees an update):
  `is_null_update` flags a zero update or one that replays the global state instead of a delta.
  `duplicate_members` flags pairs whose flattened updates point the same way (cosine >= threshold):
  a copy of another member's update, or of its data. Treatment: pass the pairs to
  aggregation/shapley.py's `gtg_shapley` as `duplicates=`, which counts each flagged cluster once
  in every coalition, so the cluster's value is split equally among its members.
  Copying never creates value, it can only share the original's. Within one round nobody can
  tell the original from the copy; the pairs are returned so the operator's policy (and the
  ledger) can act on them. Stale copies (a member replaying an earlier round's update, its own or
  someone else's) are found the same way by passing last round's updates under other names.
  Noise updates need no rule: their Shapley value is about zero or negative, and clipped to zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from aggregation.contribution import ContributionError


def delta_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a delta over all its tensors (fp64 sums)."""
    return math.sqrt(
        math.fsum(float(t.detach().to(torch.float64).square().sum()) for t in update.values())
    )


def is_null_update(
    update: Mapping[str, torch.Tensor],
    *,
    rel_tol: float = 1e-6,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> bool:
    """True when `update` (a delta) carries no training.

    With `reference` (the global trainable state the member was sent): null when
    ||update|| <= rel_tol x ||reference|| (no change), or when ||update - reference|| <=
    rel_tol x ||reference|| on the reference's tensors (the global state sent back as if it were
    a delta). Without a reference only updates with ||update|| <= rel_tol are null. An update with
    no tensors is null.
    """
    if not update:
        return True
    norm = delta_norm(update)
    if reference is None:
        return norm <= rel_tol
    ref_norm = delta_norm(reference)
    if norm <= rel_tol * ref_norm:
        return True
    if set(update) == set(reference):
        replay = {
            k: update[k].detach().to(torch.float64) - reference[k].detach().to(torch.float64)
            for k in update
            if update[k].shape == reference[k].shape
        }
        if len(replay) == len(update) and delta_norm(replay) <= rel_tol * ref_norm:
            return True
    return False


def duplicate_members(
    updates: Mapping[str, Mapping[str, torch.Tensor]], *, threshold: float = 0.99
) -> list[tuple[str, str]]:
    """Pairs (a, b), a < b, whose flattened updates have cosine similarity >= threshold.

    Tensors are matched by name; a tensor one member did not send counts as zeros for it (members
    train different experts). Zero updates are skipped (no direction; see `is_null_update`).
    """
    members = sorted(updates)
    n = len(members)
    gram = torch.zeros(n, n, dtype=torch.float64)  # (members, members) inner products
    names = sorted({name for u in updates.values() for name in u})
    for name in names:
        holders = [i for i, m in enumerate(members) if name in updates[m]]
        shape = updates[members[holders[0]]][name].shape
        for i in holders:
            if updates[members[i]][name].shape != shape:
                raise ContributionError(
                    f"member {members[i]!r}: tensor {name!r} has shape "
                    f"{tuple(updates[members[i]][name].shape)}, expected {tuple(shape)}"
                )
        rows = torch.stack(
            [updates[members[i]][name].detach().to(torch.float64).reshape(-1) for i in holders]
        )  # (holders, numel)
        idx = torch.tensor(holders)
        gram[idx.unsqueeze(1), idx.unsqueeze(0)] += rows @ rows.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == 0 or norms[j] == 0:
                continue
            if float(gram[i, j] / (norms[i] * norms[j])) >= threshold:
                pairs.append((members[i], members[j]))
    return pairs
