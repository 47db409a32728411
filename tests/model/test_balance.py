"""Consortium-level load balancing: exact on planted routing, and it steers a member towards the
experts the consortium underuses, where per-member balancing steers it off its own favourites."""

from __future__ import annotations

import pytest
import torch

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from model.moe import balance_loss


def planted_logits(n: int = 64) -> torch.Tensor:
    """A member whose tokens prefer expert 2, then 3: (n, 4) router logits."""
    torch.manual_seed(0)
    return torch.randn(n, 4) * 0.1 + torch.tensor([0.0, 0.0, 2.0, 1.0])


def test_member_balance_is_the_switch_loss_on_the_batch() -> None:
    logits = planted_logits()
    probs = logits.softmax(-1)
    chosen = logits.topk(2, dim=-1).indices.flatten()
    f = torch.bincount(chosen, minlength=4).float() / chosen.numel()
    expected = 2 * 4 * (f * probs.mean(0)).sum()
    assert torch.allclose(balance_loss((logits, logits), 2), expected)
    # on transformers' scale: one layer gives exactly its Mixtral auxiliary loss
    assert torch.allclose(balance_loss((logits,), 2), load_balancing_loss_func((logits,), 4, 2))
    # a consortium load equal to the member's own, at any weight, is the same loss
    assert torch.allclose(balance_loss((logits,), 2, f[None], weight=0.3), expected)


def bias_step(reference: torch.Tensor | None, weight: float) -> torch.Tensor:
    """The router-bias change one gradient step on the balance loss makes, (E,)."""
    bias = torch.zeros(4, requires_grad=True)
    loss = balance_loss((planted_logits() + bias,), 2, reference, weight)
    loss.backward()
    return -bias.grad


def test_consortium_balance_moves_a_member_towards_experts_the_consortium_underuses() -> None:
    # the other members overload experts 0 and 1; this member's favourite 2 is underused overall
    consortium = torch.tensor([[0.45, 0.45, 0.05, 0.05]])
    towards = bias_step(consortium, weight=0.2)
    assert towards[2] > 0 and towards[3] > 0 and towards[0] < 0 and towards[1] < 0
    # balancing its own batch instead pushes the member off expert 2: the opposite direction
    own = bias_step(None, weight=1.0)
    assert own[2] < 0 and own[0] > 0


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_the_load_carries_no_gradient_only_the_router_probabilities_do(weight: float) -> None:
    logits = planted_logits().requires_grad_(True)
    reference = torch.full((1, 4), 0.25, requires_grad=True)
    balance_loss((logits,), 2, reference, weight).backward()
    assert reference.grad is None and logits.grad is not None and logits.grad.abs().sum() > 0
