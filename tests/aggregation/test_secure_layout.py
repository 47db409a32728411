"""aggregation/secure.py: what a member feeds into secure aggregation and what the sum decodes to.

The decoded sum must be the token-weighted sum of the members' updates (within the codec's
quantization) and the exact sum of their weights; counts above the budget are clipped; and a sum
that no set of honest inputs could produce is refused.
"""

from __future__ import annotations

import pytest
import torch

from aggregation.codec import encode
from aggregation.codec_config import CodecConfig
from aggregation.secure import TOKENS, SecureInputError, SecureLayout

SHAPES = {"attn.lora_B": (6, 4), "experts.0.lora_B": (8, 4), "experts.1.lora_B": (8, 4)}
GROUPS = {"attn.lora_B": TOKENS, "experts.0.lora_B": "0:0", "experts.1.lora_B": "0:1"}
BUDGET = 1000


def layout(spec: str = "int8") -> SecureLayout:
    return SecureLayout(SHAPES, GROUPS, CodecConfig.parse(spec, clip=0.05), codec_seed=7, budget=BUDGET)


def member_input(lay: SecureLayout, delta: dict[str, torch.Tensor], tokens: int, experts: dict[str, int], seed: int) -> torch.Tensor:
    counts = lay.weights(tokens, experts)
    payload = encode(lay.prescale(delta, counts), lay.codec, seed=lay.codec_seed, generator=torch.Generator().manual_seed(seed))
    return lay.encode(payload, counts)


def deltas(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(s, generator=g) - 0.5) * 0.08 for n, s in SHAPES.items()}


def test_the_decoded_sum_is_the_token_weighted_sum_and_the_weights_are_exact() -> None:
    lay = layout()
    members = [(deltas(i), tokens, experts) for i, (tokens, experts) in enumerate(
        [(800, {"0:0": 300, "0:1": 500}), (400, {"0:0": 400}), (1000, {"0:1": 10})])]
    total = sum(member_input(lay, d, t, e, i) for i, (d, t, e) in enumerate(members))
    assert int(total.max()) <= 3 * 2 * lay.qmax
    sums, weights = lay.decode_sum(total, 3)
    assert weights == {"attn.lora_B": 2.2, "experts.0.lora_B": 0.7, "experts.1.lora_B": 0.51}
    for name, group in GROUPS.items():
        want = sum(d[name] * ((t if group == TOKENS else e.get(group, 0)) / BUDGET) for d, t, e in members)
        step = 0.05 / lay.qmax  # one quantization step per member, at most
        assert (sums[name] - want).abs().max() <= 3 * step + 1e-7, name


def test_counts_are_clipped_to_the_budget_and_experts_to_the_tokens() -> None:
    lay = layout()
    assert lay.weights(5 * BUDGET, {"0:0": 5 * BUDGET, "0:1": -3}) == {TOKENS: BUDGET, "0:0": BUDGET, "0:1": 0}
    assert lay.weights(100, {"0:0": 900}) == {TOKENS: 100, "0:0": 100, "0:1": 0}


def test_sums_no_honest_members_could_produce_are_refused() -> None:
    lay = layout()
    honest = [member_input(lay, deltas(i), 1000, {"0:0": 1000, "0:1": 1000}, i) for i in range(2)]
    total = honest[0] + honest[1]
    lay.decode_sum(total, 2)  # fine
    bad = total.clone()
    bad[3] = 2 * 2 * lay.qmax + 1  # an element above what two inputs can reach
    with pytest.raises(SecureInputError, match="a member's input was out of range"):
        lay.decode_sum(bad, 2)
    with pytest.raises(SecureInputError, match="sum has shape"):
        lay.decode_sum(total[:-1], 2)
    # the limbs are the vector's last elements: tokens, then experts 0:0 and 0:1
    k = lay.limbs
    tokens, expert0, expert1 = slice(-3 * k, -2 * k), slice(-2 * k, -k), slice(-k, None)

    def limbs(count: int) -> torch.Tensor:
        return torch.tensor([(count >> (lay.limb_bits * i)) % (1 << lay.limb_bits) for i in range(k)])

    forged = honest[0].clone()
    forged[tokens], forged[expert0], forged[expert1] = limbs(2 * BUDGET), limbs(0), limbs(0)
    with pytest.raises(SecureInputError, match="token weights sum to 2 budgets, more than the 1 members may claim"):
        lay.decode_sum(forged, 1)
    forged[tokens], forged[expert1] = limbs(10), limbs(11)
    with pytest.raises(SecureInputError, match="expert 0:1 has more token weight"):
        lay.decode_sum(forged, 1)
