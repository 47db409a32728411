"""The operator's side of member-level DP: the noise a run's sums carry and the ε spent so far.

The noise is calibrated once per run, from `dp-member-epsilon` and `dp-member-delta` over
`num-rounds` rounds, in the units of the masked sums (privacy/distributed_dp.py); every member
adds its share of it under secure aggregation. The ε after k committed rounds is the same
accountant over k rounds: each round's sums carry at least the calibrated variance whatever the
dropouts (a dropout takes its share away, and the shares are sized for the fewest survivors
the protocol unmasks). The consortium's sums per round are one release per group; a member is
in one group per round, so its ε is that of one sum per round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aggregation.quantize import shared_scale
from aggregation.secure import TOKENS, SecureLayout
from model.lora import expert_of
from privacy.distributed_dp import Sensitivity, calibrate, epsilon
from server.config import RunConfig


@dataclass(frozen=True)
class MemberDP:
    variance: float  # Skellam noise variance each unmasked sum carries at least, ring units
    sensitivity: Sensitivity
    delta: float

    def spent(self, rounds: int) -> float:
        """ε (at `delta`) after `rounds` rounds of sums."""
        return epsilon(rounds, self.sensitivity, self.variance, self.delta)


def member_dp(config: RunConfig, shapes: Mapping[str, tuple[int, ...]]) -> MemberDP | None:
    """The run's member-level DP, None when it is off (dp-member-epsilon = 0)."""
    if config.dp_member_epsilon <= 0:
        return None
    layout = SecureLayout(shapes, {n: expert_of(n) or TOKENS for n in shapes}, config.codec_config(), 0,
                          config.token_budget)
    sensitivity = Sensitivity.of_update(config.update_clip, shared_scale(config.codec_config()), layout.update_elements)
    variance = calibrate(config.dp_member_epsilon, config.dp_member_delta, config.num_rounds, sensitivity)
    return MemberDP(variance, sensitivity, config.dp_member_delta)

