"""Member-level DP under secure aggregation (privacy/distributed_dp.py): the members' noise shares
add up to the target variance, the accountant agrees with opacus's Gaussian one where the Skellam
mechanism becomes Gaussian, calibration inverts it, and a masked sum with noise decodes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from aggregation.codec import encode
from aggregation.codec_config import CodecConfig
from aggregation.secure import TOKENS, SecureInputError, SecureLayout
from client.secure import Noise
from privacy.secagg import ProtocolViolation
from privacy.distributed_dp import ORDERS, PrivacyConfigError, Sensitivity, calibrate, epsilon, skellam_share

from test_secagg import consortium, make_params, run_round


def _variance_matches(sample: torch.Tensor, target: float) -> bool:
    """Sample variance within 4 standard errors of `target` (the variance of a sample variance
    of n near-Gaussian draws is 2 target^2 / n)."""
    n = sample.numel()
    return abs(float(sample.double().var()) - target) <= 4 * target * math.sqrt(2 / n)


def test_shares_sized_for_the_threshold_give_the_target_variance_and_the_wrong_scale_is_caught() -> None:
    target, threshold, size = 400.0, 3, 200_000
    g = torch.Generator().manual_seed(1)
    right = sum(skellam_share(target / threshold, size, g) for _ in range(threshold))
    assert _variance_matches(right, target)
    assert float(right.double().mean()) == pytest.approx(0, abs=4 * math.sqrt(target / size))
    # a member that forgot to divide by the threshold: three times the noise; and one share alone: a third
    assert not _variance_matches(sum(skellam_share(target, size, g) for _ in range(threshold)), target)
    assert not _variance_matches(skellam_share(target / threshold, size, g), target)
    # five survivors of a threshold-3 group carry 5/3 of the target
    assert _variance_matches(sum(skellam_share(target / threshold, size, g) for _ in range(5)), target * 5 / 3)


def test_the_accountant_becomes_opacus_gaussian_one_when_the_noise_is_large() -> None:
    sensitivity = Sensitivity(l2=10.0, l1=10.0)
    sigma = 1e4  # variance 1e8: the Skellam bound's correction terms vanish
    ours = epsilon(20, sensitivity, sigma ** 2, 1e-5)
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma / sensitivity.l2, steps=20, orders=list(ORDERS))
    gaussian, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)
    assert ours == pytest.approx(gaussian, rel=1e-3)
    # at small noise the discrete mechanism costs more than the Gaussian with the same variance
    small = Sensitivity(l2=10.0, l1=300.0)
    rdp = compute_rdp(q=1.0, noise_multiplier=2.0, steps=20, orders=list(ORDERS))
    assert epsilon(20, small, 400.0, 1e-5) > get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)[0]


def test_calibration_gives_the_target_epsilon_and_refuses_what_cannot_be_met() -> None:
    sensitivity = Sensitivity.of_update(update_clip=3.0, scale=0.05 / 127, coordinates=5000)
    for target in (1.0, 4.0, 8.0):
        variance = calibrate(target, 1e-5, 12, sensitivity)
        assert epsilon(12, sensitivity, variance, 1e-5) == pytest.approx(target, rel=1e-3)
    assert calibrate(1.0, 1e-5, 12, sensitivity) > calibrate(8.0, 1e-5, 12, sensitivity)
    assert epsilon(6, sensitivity, calibrate(8.0, 1e-5, 12, sensitivity), 1e-5) < 8.0  # half the rounds spent
    for bad, match in (((0.0, 1e-5), "dp-member-epsilon"), ((math.inf, 1e-5), "dp-member-epsilon"), ((1.0, 1.5), "delta")):
        with pytest.raises(PrivacyConfigError, match=match):
            calibrate(*bad, 12, sensitivity)
    with pytest.raises(PrivacyConfigError, match="update-clip"):
        Sensitivity.of_update(update_clip=0.0, scale=0.05 / 127, coordinates=5000)


SHAPES = {"attn.lora_B": (16, 4), "experts.0.lora_B": (16, 4)}
GROUPS = {"attn.lora_B": TOKENS, "experts.0.lora_B": "0:0"}


def test_a_masked_sum_with_noise_decodes_to_the_noiseless_sum_plus_exactly_the_noise() -> None:
    codec = CodecConfig.parse("int8", clip=0.05)
    plain = SecureLayout(SHAPES, GROUPS, codec, codec_seed=3, budget=1000)
    noisy = SecureLayout(SHAPES, GROUPS, codec, codec_seed=3, budget=1000, noise_variance=2500.0)
    members, keys, directory = consortium(5)
    threshold = 3
    bits = noisy.ring_bits(len(members), threshold)
    assert bits > plain.ring_bits(len(members))  # headroom for the noise on both sides
    inputs, noise_free = {}, {}
    for i, member in enumerate(members):
        g = torch.Generator().manual_seed(i)
        counts = plain.weights(600 + 50 * i, {"0:0": 100 * i})
        delta = {n: (torch.rand(s, generator=g) - 0.5) * 0.1 for n, s in SHAPES.items()}
        payload = encode(plain.prescale(delta, counts), codec, seed=3, generator=g)
        noise_free[member] = plain.encode(payload, counts)
        inputs[member] = Noise(2500.0, noisy.update_elements).share(noise_free[member], threshold, bits)
    params = make_params(members, t=threshold, k=4, bits=bits, length=noisy.vector_length)
    total, survivors = run_round(params, keys, directory, inputs, after_shares={members[4]})  # one drops out
    assert len(survivors) == 4
    want_sums, want_weights = plain.decode_sum(sum(noise_free[m] for m in survivors), len(survivors))
    sums, weights = noisy.decode_sum(total, len(survivors), threshold=threshold, ring_bits=bits)
    assert weights == want_weights  # the counts carry no noise: exact
    # each survivor's share, read back from its ring input: what the sum must carry, element by element
    shares = []
    for member in survivors:
        share = (inputs[member] - noise_free[member]) % (1 << bits)
        share[share >= 1 << (bits - 1)] -= 1 << bits
        assert not share[noisy.update_elements:].any()  # nothing on the counts
        shares.append(share[: noisy.update_elements])
    scale = 0.05 / 127
    decoded = torch.cat([(sums[n] - want_sums[n]).flatten() for n in sorted(SHAPES)]) / scale
    assert torch.equal(decoded.round().to(torch.int64), sum(shares))
    assert torch.allclose(decoded, decoded.round(), atol=1e-3)
    assert float(sum(shares).abs().max()) > 0
    with pytest.raises(SecureInputError, match="ring width"):
        noisy.decode_sum(total, len(survivors), threshold=threshold)


def test_a_re_run_round_adds_the_same_noise_so_two_unmaskings_cannot_be_averaged(tmp_path) -> None:
    """A server that re-runs a round after unmasking it (a crash, or a claimed one) would get a
    second sum of the same updates; with fresh noise, averaging the two would halve its variance.
    The member keeps one seed per update (what `trained-from` names) and adds the same share."""
    from client.secure import _noise, keep_input, round_dir

    vector = torch.arange(64, dtype=torch.int64)
    shares = []
    for trained_from in ("view a round 3 seed 7", "view a round 3 seed 7", "view b round 3 seed 7"):
        keep_input(tmp_path, "run", 3, vector, trained_from, Noise(400.0, 48))
        noise = _noise(round_dir(tmp_path, "run", 3) / "noise.json")
        shares.append(noise.share(vector, threshold=2, ring_bits=32))
    assert torch.equal(shares[0], shares[1])  # the re-run: identical, nothing new to average
    assert not torch.equal(shares[0], shares[2])  # another update: a fresh draw
    assert not torch.equal(shares[0], vector % (1 << 32)) and torch.equal(shares[0][48:], vector[48:])
    fresh = Noise(400.0, 48)  # no seed kept (a share outside keep_input): a fresh draw each time
    assert not torch.equal(fresh.share(vector, 2, 32), fresh.share(vector, 2, 32))
    (tmp_path / "secagg" / "noise-seeds.json").write_text("{broken")
    with pytest.raises(ProtocolViolation, match="noise-seeds.json: DP noise seeds unreadable"):
        keep_input(tmp_path, "run", 4, vector, "view c round 4", Noise(400.0, 48))
