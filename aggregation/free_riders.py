"""Free-rider detectors: updates that carry no training, copies of others' updates, and updates
that bring nothing the round's other updates do not already bring.

Pure helpers over update tensors, open mode only (secure mode never sees an update):
  `is_null_update` flags a zero update or one that replays the global state instead of a delta.
  `duplicate_members` flags pairs whose flattened updates point the same way (cosine >= threshold):
  a copy of another member's update, or of its data. Treatment: pass the pairs to
  aggregation/shapley.py's `gtg_shapley` as `duplicates=`, which counts each flagged cluster once
  in every coalition, so the cluster's value is split equally among its members.
  `novel_descent` is the test that does not depend on how much noise a free rider adds: the part
  of a member's update that the round's other updates and the references (the consortium's last
  change) do not explain, by least squares, must point downhill on some validation domain, by a
  self-normalized z statistic (below). A copy of another member's update plus noise of any size,
  a replay of the last change plus noise, and pure noise all leave only noise in that residual.
  The original of a copy keeps the part of its update that the copier's noise took away: its
  residual still points downhill (z about eps x its own z, for noise eps x its norm), so the
  copier is caught and the original is not, unless the noise is tiny (eps of a few percent, when
  the copy is also a cosine duplicate and both fail the test: within one round only a colluding
  member can hold another member's update, since members never see each other's).

The z statistic: for a residual r and a validation gradient g, per tensor t, z_t = -sum_i r_i
g_i / sqrt(sum_i r_i^2 g_i^2), combined over the tensors as sum_t z_t / sqrt(T) (Stouffer). When r
is noise independent of g with zero-mean coordinates of any scales, each z_t is close to a
standard normal (a self-normalized sum), and so is their combination, so a threshold of 4 is a
false alarm about once in 30,000 per domain. Per tensor, because gradient scales differ by
orders of magnitude between layers: over the whole update a few large coordinates would set the
denominator and cap z near the square root of their number. Measured on the demo: honest updates
score 34-69 on their own domain (the whole-update statistic gave 7.5-18.5), 10x-norm Gaussian
noise -0.7 to 2.2. Passing needs a direction that lowers validation loss and that nobody else
sent: training.

These statistics (least squares over a ragged set of named tensors, a self-normalized sum) are
not in torch or scipy, hence the few lines here.
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


EXPLAINED = 1e-6  # a residual this small next to its update is rounding error: nothing new


def _gram(vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """(names in order, their (n, n) fp64 inner products); a tensor one vector lacks counts as zeros."""
    members = sorted(vectors)
    n = len(members)
    gram = torch.zeros(n, n, dtype=torch.float64)  # (members, members) inner products
    names = sorted({name for u in vectors.values() for name in u})
    for name in names:
        holders = [i for i, m in enumerate(members) if name in vectors[m]]
        shape = vectors[members[holders[0]]][name].shape
        for i in holders:
            if vectors[members[i]][name].shape != shape:
                raise ContributionError(
                    f"member {members[i]!r}: tensor {name!r} has shape "
                    f"{tuple(vectors[members[i]][name].shape)}, expected {tuple(shape)}"
                )
        rows = torch.stack(
            [vectors[members[i]][name].detach().to(torch.float64).reshape(-1) for i in holders]
        )  # (holders, numel)
        idx = torch.tensor(holders)
        gram[idx.unsqueeze(1), idx.unsqueeze(0)] += rows @ rows.T
    return members, gram


def duplicate_members(
    updates: Mapping[str, Mapping[str, torch.Tensor]], *, threshold: float = 0.99
) -> list[tuple[str, str]]:
    """Pairs (a, b), a < b, whose flattened updates have cosine similarity >= threshold.

    Tensors are matched by name; a tensor one member did not send counts as zeros for it (members
    train different experts). Zero updates are skipped (no direction; see `is_null_update`).
    """
    members, gram = _gram(updates)
    n = len(members)
    norms = gram.diagonal().clamp_min(0).sqrt()
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == 0 or norms[j] == 0:
                continue
            if float(gram[i, j] / (norms[i] * norms[j])) >= threshold:
                pairs.append((members[i], members[j]))
    return pairs


def descent_z(residual: Mapping[str, torch.Tensor], gradient: Mapping[str, torch.Tensor]) -> float:
    """Stouffer's combination of each tensor's z = -sum r g / sqrt(sum r^2 g^2), over the tensors
    both hold where that is not 0/0 (0.0 when there is none)."""
    zs = []
    for name, r in residual.items():
        if name in gradient:
            product = r.detach().to(torch.float64) * gradient[name].detach().to(torch.float64)
            spread = float(product.square().sum())
            if spread > 0:
                zs.append(-float(product.sum()) / math.sqrt(spread))
    return math.fsum(zs) / math.sqrt(len(zs)) if zs else 0.0


def novel_descent(
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    gradients: Mapping[str, Mapping[str, torch.Tensor]],
    references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Per member: the largest `descent_z`, over the validation `gradients` (domain -> tensors),
    of the residual of its update after least squares on the other members' updates and the
    `references` (names that are not members, e.g. the consortium's last change)."""
    references = dict(references or {})
    clash = sorted(set(references) & set(updates))
    if clash:
        raise ContributionError(f"reference {clash[0]!r} has a member's name")
    names, gram = _gram({**updates, **references})
    index = {m: i for i, m in enumerate(names)}
    vectors = {**updates, **references}
    out: dict[str, float] = {}
    for member in sorted(updates):
        i = index[member]
        others = [j for j in range(len(names)) if j != i and gram[j, j] > 0]
        residual = {k: v.detach().to(torch.float64) for k, v in updates[member].items()}
        if others:
            sub = gram[others][:, others]
            coef = torch.linalg.pinv(sub, hermitian=True, rtol=1e-10) @ gram[others, i]  # least squares
            for c, j in zip(coef.tolist(), others):
                for name, t in vectors[names[j]].items():
                    term = c * t.detach().to(torch.float64)
                    residual[name] = residual[name] - term if name in residual else -term
        if delta_norm(residual) <= EXPLAINED * math.sqrt(float(gram[i, i])):
            out[member] = 0.0  # the others explain it to rounding: z of rounding error means nothing
        else:
            out[member] = max((descent_z(residual, g) for g in gradients.values()), default=0.0)
    return out
