"""Expert specialization across members: the consortium's expert load and how members share experts.

Counts are tokens routed per expert ('l:e' -> tokens), per member or summed over the consortium.
- `consortium_load`: per layer, the fraction of the consortium's routed tokens each expert got,
  (L, E); what the server sends with TRAIN so members balance against the consortium's load.
- `top_member_share`: per expert, the share of its routed tokens that came from the member that
  routed most to it, averaged over the experts that got any: 1/members when every member
  spreads evenly, 1.0 when every expert belongs to one member.
- `routing_entropy`: one member's routing entropy per layer over the experts, normalized by
  log E and averaged over layers: 1.0 is uniform routing, 0 one expert per layer.
Pure functions over counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def _grid(counts: Mapping[str, float], layers: int, experts: int) -> torch.Tensor:
    if layers < 1 or experts < 2:
        raise ValueError(f"{layers} layers x {experts} experts: need a layer and two experts")
    grid = torch.zeros(layers, experts, dtype=torch.float64)
    for group, n in counts.items():
        layer, expert = (int(part) for part in group.split(":"))
        if not (0 <= layer < layers and 0 <= expert < experts):
            raise ValueError(f"expert {group!r} outside {layers} layers x {experts} experts")
        grid[layer, expert] += float(n)
    return grid


def consortium_load(counts: Mapping[str, float], layers: int, experts: int) -> torch.Tensor:
    """(L, E) fractions per layer; a layer nobody routed through is uniform."""
    grid = _grid(counts, layers, experts)
    totals = grid.sum(dim=1, keepdim=True)
    uniform = torch.full_like(grid, 1.0 / experts)
    return torch.where(totals > 0, grid / totals.clamp_min(1e-300), uniform).to(torch.float32)


def top_member_share(by_member: Mapping[str, Mapping[str, float]], layers: int, experts: int) -> float | None:
    """Mean over experts (that got tokens) of max_member tokens / all tokens; None without tokens."""
    if not by_member:
        return None
    grids = torch.stack([_grid(c, layers, experts) for c in by_member.values()])  # (M, L, E)
    total = grids.sum(dim=0)
    used = total > 0
    if not used.any():
        return None
    return float((grids.max(dim=0).values[used] / total[used]).mean())


def routing_entropy(counts: Mapping[str, float], layers: int, experts: int) -> float | None:
    """Normalized entropy of one member's routing, averaged over the layers it routed through."""
    grid = _grid(counts, layers, experts)
    entropies = []
    for row in grid:
        total = float(row.sum())
        if total <= 0:
            continue
        p = row[row > 0] / total
        entropies.append(float(-(p * p.log()).sum()) / math.log(experts))
    return sum(entropies) / len(entropies) if entropies else None
