"""What a member feeds into secure aggregation, and what the server makes of the sum.

Secure aggregation (privacy/secagg.py) sums vectors of ring elements; it knows nothing about
tensors or weights. This module is the bridge, used identically on both sides of a round:

    member:  delta, counts --pre-scale, codec, shift--> one int vector in [0, 2*qmax]
    server:  sum of n such vectors --unshift, recombine--> sum_i w_i*delta_i and sum_i w_i

Weighting under secrecy. The server cannot weight updates it never sees, so every member weights
its own: a tensor is multiplied by w = count / budget before quantization, where count is the
member's tokens (adapters, router) or the tokens it routed to the tensor's expert, clipped to the
round's token budget (so nobody can claim more than the budget's weight), and the counts
themselves travel in the same masked vector. The server divides the secure sum by the secure
total of the weights, per tensor: exactly the token-weighted mean of aggregation/fedavg.py. An
expert a member did not send (too few tokens routed to it) has weight 0 and an all-zero slot.

Layout of the vector (the same order on every member, from the trainable manifest):
  1. for each tensor, sorted by name, the codec's integers of its kept coordinates (shared-seed
     random-k, so no indices), shifted by +qmax into [0, 2*qmax];
  2. for each weight group (one "tokens" group, then each expert "l:e"), its count in base-2^m
     limbs with 2^m <= 2*qmax + 1, so a limb is no wider than an update element.
Every element is then in [0, 2*qmax], n members' sum is below n*2*qmax + 1, and the ring needs
only ceil(log2(n*2*qmax + 1)) bits: 12 bits for 10 members with int8, against 8 without secure
aggregation. Counts are exact integers (limbs are recombined after summing); updates are the
codec's integers summed exactly (decode_integers / dequantize_sum).

Member-level DP (privacy/distributed_dp.py): with `noise_variance` > 0 every member adds its share
of Skellam noise to the update elements (not to the counts) before masking, so a sum's elements
may stray `headroom` below 0 or above n*2*qmax; the ring is that much wider, and a sum's element
above the top of that range is a negative one wrapped around the ring.

Written here: no library joins a codec to a masking protocol; the arithmetic is a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from aggregation.codec import decode_integers, dequantize_sum
from aggregation.codec_config import CodecConfig
from aggregation.quantize import shared_scale
from aggregation.sparsify import kept_count
from privacy.distributed_dp import headroom
from privacy.secagg import MAX_RING_BITS, InvalidInput, ring_bits_for

TOKENS = "tokens"  # the weight group of every tensor that belongs to no expert

_QMAX = {"int8": 127, "int4": 7}


class SecureInputError(ValueError):
    """A member's delta or counts that do not fit the round's layout."""


@dataclass(frozen=True)
class SecureLayout:
    shapes: Mapping[str, tuple[int, ...]]  # the trainable manifest
    groups: Mapping[str, str]  # tensor name -> weight group (TOKENS or "l:e")
    codec: CodecConfig  # secure-compatible: shared clip, no topk
    codec_seed: int  # the round's shared seed (random-k coordinates)
    budget: int  # the round's token budget (local_steps * batch_size * seq_len)
    noise_variance: float = 0.0  # member-level DP: Skellam noise variance every unmasked sum carries at least
    _kept: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.codec.secure_compatible:
            raise SecureInputError(
                f"codec {self.codec} (clip {self.codec.clip}) cannot be summed blind: secure "
                "aggregation needs int8/int4 with a shared codec-clip and no topk"
            )
        if self.budget < 1:
            raise SecureInputError(f"token budget {self.budget} is below 1")
        if set(self.groups) != set(self.shapes):
            raise SecureInputError("weight groups must name every tensor of the manifest")
        kept = {}
        for name, shape in self.shapes.items():
            numel = math.prod(shape)
            kept[name] = numel if self.codec.sparsify == "none" else kept_count(numel, self.codec.density)
        object.__setattr__(self, "_kept", kept)

    @property
    def qmax(self) -> int:
        return _QMAX[self.codec.quant]

    @property
    def weight_groups(self) -> list[str]:
        experts = sorted({g for g in self.groups.values() if g != TOKENS})
        return [TOKENS, *experts]

    @property
    def limb_bits(self) -> int:
        return (2 * self.qmax + 1).bit_length() - 1

    @property
    def limbs(self) -> int:
        return math.ceil(self.budget.bit_length() / self.limb_bits)

    @property
    def vector_length(self) -> int:
        return sum(self._kept.values()) + len(self.weight_groups) * self.limbs

    @property
    def update_elements(self) -> int:
        """The leading elements of the vector that carry the update (the counts follow)."""
        return sum(self._kept.values())

    def headroom(self, members: int, threshold: int) -> int:
        """How far DP noise moves a sum of `members` inputs outside [0, members*2*qmax]."""
        return headroom(self.noise_variance, members, threshold)

    def ring_bits(self, members: int, threshold: int = 1) -> int:
        """Bits the sum of `members` vectors needs without wrapping (noise headroom on both sides)."""
        bits = ring_bits_for(members, self.qmax)
        if self.noise_variance > 0:
            bits = max(bits, (members * 2 * self.qmax + 2 * self.headroom(members, threshold)).bit_length())
            if bits > MAX_RING_BITS:
                raise InvalidInput(f"noise variance {self.noise_variance:g} needs a {bits}-bit ring > {MAX_RING_BITS}")
        return bits

    def weights(self, num_tokens: int, expert_tokens: Mapping[str, int]) -> dict[str, int]:
        """Each weight group's count, clipped to the budget (what the member may claim)."""
        counts = {TOKENS: min(max(int(num_tokens), 0), self.budget)}
        for group in self.weight_groups[1:]:
            counts[group] = min(max(int(expert_tokens.get(group, 0)), 0), counts[TOKENS])
        return counts

    def prescale(
        self, delta: Mapping[str, torch.Tensor], counts: Mapping[str, int]
    ) -> dict[str, torch.Tensor]:
        """w * delta per tensor (w = count / budget); tensors of weight-0 groups are left out."""
        out = {}
        for name, tensor in delta.items():
            if name not in self.shapes:
                raise SecureInputError(f"tensor {name!r} is not in the trainable manifest")
            if tuple(tensor.shape) != tuple(self.shapes[name]):
                raise SecureInputError(f"tensor {name!r} has shape {tuple(tensor.shape)}")
            count = counts[self.groups[name]]
            if count > 0:
                out[name] = tensor.detach().float() * (count / self.budget)
        return out

    def encode(self, payload: bytes, counts: Mapping[str, int]) -> torch.Tensor:
        """The member's ring input from its codec payload (of `prescale`d tensors) and counts."""
        ints = decode_integers(
            payload, self.shapes, member="self", max_bytes=len(payload), seed=self.codec_seed,
            config=self.codec,
        )
        parts = []
        for name in sorted(self.shapes):
            if name in ints and counts[self.groups[name]] > 0:
                parts.append(ints[name][0] + self.qmax)
            else:
                parts.append(torch.full((self._kept[name],), self.qmax, dtype=torch.int64))
        base = 1 << self.limb_bits
        for group in self.weight_groups:
            count = counts[group]
            if not 0 <= count <= self.budget:
                raise SecureInputError(f"count of {group} is {count}, outside [0, {self.budget}]")
            parts.append(torch.tensor([(count >> (self.limb_bits * i)) % base for i in range(self.limbs)]))
        return torch.cat(parts).to(torch.int64)

    def decode_sum(
        self, total: torch.Tensor, members: int, *, threshold: int = 1, ring_bits: int = 0
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(sum_i w_i * delta_i, sum_i w_i) per tensor from the sum of `members` inputs.

        Weights are in units of the budget; a tensor whose weight sum is 0 is left out. With DP
        noise, `threshold` and `ring_bits` are the group's: the noise's headroom and the ring
        its negative elements wrapped around.
        """
        if total.shape != (self.vector_length,):
            raise SecureInputError(f"sum has shape {tuple(total.shape)}, expected ({self.vector_length},)")
        spread = self.headroom(members, threshold)
        if spread:
            if not ring_bits:
                raise SecureInputError("a sum with DP noise needs its ring width to be decoded")
            total = total.clone()
            update = total[: self.update_elements]
            update[update > members * 2 * self.qmax + spread] -= 1 << ring_bits  # wrapped negatives
        # Every honest input element is in [0, 2*qmax] (plus the noise's spread), so the sum of
        # `members` of them is in [0, members*2*qmax]: anything outside means some member fed in
        # out-of-range elements. (In-range garbage cannot be told from an update here; that would
        # take range proofs.)
        for part, lowest, highest in ((total[: self.update_elements], -spread, members * 2 * self.qmax + spread),
                                      (total[self.update_elements:], 0, members * 2 * self.qmax)):
            low, high = (int(part.min()), int(part.max())) if part.numel() else (0, 0)
            if low < lowest or high > highest:
                raise SecureInputError(
                    f"sum of {members} inputs has elements in [{low}, {high}], outside [{lowest}, {highest}]: "
                    "a member's input was out of range"
                )
        offset = 0
        integers = {}
        for name in sorted(self.shapes):
            k = self._kept[name]
            integers[name] = total[offset : offset + k] - members * self.qmax
            offset += k
        weight_sums = {}
        for group in self.weight_groups:
            limbs = total[offset : offset + self.limbs].tolist()
            offset += self.limbs
            weight_sums[group] = sum(int(v) << (self.limb_bits * i) for i, v in enumerate(limbs)) / self.budget
        tokens = weight_sums[TOKENS]
        if tokens > members:
            raise SecureInputError(f"token weights sum to {tokens:g} budgets, more than the {members} members may claim")
        over = [g for g, w in weight_sums.items() if w > tokens]
        if over:
            raise SecureInputError(f"expert {over[0]} has more token weight ({weight_sums[over[0]]:g}) than all tokens ({tokens:g})")
        sums, weights = {}, {}
        scale = shared_scale(self.codec)
        for name, values in integers.items():
            w = weight_sums[self.groups[name]]
            if w <= 0:
                continue
            sums[name] = dequantize_sum(
                name, values, scale, tuple(self.shapes[name]), self.codec, seed=self.codec_seed
            )
            weights[name] = w
        return sums, weights
