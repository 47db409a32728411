"""Free-rider detectors: updates that carry no training, copies of others' updates, and updates
that bring nothing the round's other updates do not already bring.

Pure helpers over update tensors, open mode only (secure mode never sees an update):
  `is_null_update` flags a zero update or one that replays the global state instead of a delta.
  `duplicate_members` flags pairs whose flattened updates point the same way (cosine >= threshold):
  a copy of another member's update, or of its data. Treatment: pass the pairs to
  aggregation/shapley.py's `gtg_shapley` as `duplicates=`, which counts each flagged cluster once
  in every coalition, so the cluster's value is split equally among its members.
  `novel_descent` is the test that does not depend on how much noise a free rider adds: the part
  of a member's update that the round's other updates and the references (the consortium's
  public history, server/history.py: past rounds' changes and the path so far) do not explain
  must point downhill on some validation domain. The fit is per tensor
  (least squares of the member's tensor on the same tensor of the others), and so is the test,
  in the same geometry: rescaling, zeroing or sign-flipping some tensors of a copy or a replay
  leaves them explained, and tensors the member did not send do not count (members send only
  the experts they routed to). A copy of another member's update plus noise of any size, a
  replay of a referenced change plus noise, and pure noise all leave only noise in the residual.
  The original of a copy keeps the part of its update that the copier's noise took away: its
  residual still points downhill (z about eps x its own z, for noise eps x its norm), so the
  copier is caught and the original is not, unless the noise is tiny (eps of a few percent, when
  both fail the test: within one round only a colluding member can hold another member's update,
  since members never see each other's).
  Limits: members with the same data bring little that the others do not (their residuals are
  mostly their own SGD noise), so they may score 0 together; a nonlinear function of the last
  change (e.g. its signs) is not in the span the fit removes, which is why the replay cosine rule
  of server/scoring.py stays as well; and only what the caller references is explained: with the
  last change alone, an older round's change with its part along the last change removed passed
  (a reviewer's simulation: z 19 and a real Shapley share), hence the window of past changes.

The z statistic: for a residual r and a validation gradient g, per tensor t, z_t = -sum_i r_i
g_i / sqrt(sum_i r_i^2 g_i^2), combined over the T tensors sent as sum_t z_t / sqrt(T)
(Stouffer). When r is noise independent of g with zero-mean coordinates of any scales, each z_t
is close to a standard normal (a self-normalized sum), and so is their combination, so a
threshold of 4 is a false alarm about once in 30,000 per domain. Per tensor, because gradient
scales differ by orders of magnitude between layers: over the whole update a few large
coordinates would set the denominator and cap z near the square root of their number. Measured
on the demo's honest updates on their own domain (3 rounds, before the fit was per tensor): 34-75
per tensor against 7.5-18.5 over the whole update, unfitted; 15-64 after the fit; 10x-norm
Gaussian noise -0.7 to 2.2. Passing needs a direction that lowers validation loss and that
nobody else sent: training.

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


def _rows(vectors: Mapping[str, Mapping[str, torch.Tensor]], name: str) -> tuple[list[str], torch.Tensor]:
    """(the vectors that hold tensor `name`, in name order; their values as fp64 CPU rows)."""
    holders = sorted(v for v in vectors if name in vectors[v])
    shape = vectors[holders[0]][name].shape
    for holder in holders:
        if vectors[holder][name].shape != shape:
            raise ContributionError(
                f"member {holder!r}: tensor {name!r} has shape "
                f"{tuple(vectors[holder][name].shape)}, expected {tuple(shape)}"
            )
    return holders, torch.stack([vectors[h][name].detach().to("cpu", torch.float64).reshape(-1) for h in holders])


def _gram(vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """(names in order, their (n, n) fp64 inner products); a tensor one vector lacks counts as zeros."""
    members = sorted(vectors)
    index = {m: i for i, m in enumerate(members)}
    gram = torch.zeros(len(members), len(members), dtype=torch.float64)  # (members, members)
    for name in sorted({name for u in vectors.values() for name in u}):
        holders, rows = _rows(vectors, name)  # (holders, numel)
        idx = torch.tensor([index[h] for h in holders])
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


def novel_descent(
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    gradients: Mapping[str, Mapping[str, torch.Tensor]],
    references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Per member: the largest, over the validation `gradients` (domain -> tensors), Stouffer z of
    what only it sent. Per tensor it sent: the residual after least squares on that tensor of the
    other members and the `references` that hold it (names that are not members, e.g. the
    consortium's last change), and its z = -sum r g / sqrt(sum r^2 g^2); a tensor the others
    explain to rounding scores 0. Combined: sum of z over sqrt(tensors counted), counting the
    nonzero tensors it sent where the domain's gradient is not zero (a tensor no validation token
    reaches, or a LoRA A while B is still 0, would only dilute). The fit is on unit rows, so that
    one huge row does not push the others under the pseudo-inverse's cut-off."""
    references = dict(references or {})
    clash = sorted(set(references) & set(updates))
    if clash:
        raise ContributionError(f"reference {clash[0]!r} has a member's name")
    vectors = {**updates, **references}
    totals = {m: dict.fromkeys(gradients, 0.0) for m in updates}
    counted = {m: dict.fromkeys(gradients, 0) for m in updates}  # tensors it sent where the domain has a gradient
    for name in sorted({name for u in updates.values() for name in u}):
        holders, rows = _rows(vectors, name)  # (holders, numel)
        norms = rows.norm(dim=1)
        rows = rows / norms.clamp_min(1e-300).unsqueeze(1)  # unit rows: the fit's cut-off is not set by scale
        gram = rows @ rows.T
        residuals: dict[str, torch.Tensor | None] = {}  # member -> what only it sent (None: explained)
        for i, member in enumerate(holders):
            if member not in updates or norms[i] == 0:
                continue
            others = [j for j in range(len(holders)) if j != i and norms[j] > 0]
            residual = rows[i]
            if others:
                coef = torch.linalg.pinv(gram[others][:, others], hermitian=True, rtol=1e-10) @ gram[others, i]
                residual = rows[i] - coef @ rows[others]
            residuals[member] = residual if float(residual.norm()) > EXPLAINED else None
        for domain, gradient in gradients.items():
            g = gradient[name].detach().to("cpu", torch.float64).reshape(-1) if name in gradient else None
            if g is None or not bool(g.any()):
                continue  # no validation signal on this tensor: it neither counts nor dilutes
            for member, residual in residuals.items():
                counted[member][domain] += 1
                if residual is not None:
                    product = residual * g
                    variance = float(product.square().sum())
                    if variance > 0:
                        totals[member][domain] += -float(product.sum()) / math.sqrt(variance)
    return {m: max((totals[m][d] / math.sqrt(counted[m][d]) for d in gradients if counted[m][d]), default=0.0)
            for m in sorted(updates)}
