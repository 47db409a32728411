"""Record-level DP-SGD (privacy/dp.py): per-sample gradients, clipping and noise, the accountant,
the node's budget across restarts, and the node config that turns it on."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client.trainer import TrainConfig, train_local
from model import families
from model.lora import LoraMoE, LoraSpec
from model.moe import MoEConfig, build_model
from model.precision import select_precision
from privacy.dp import (
    BUDGET_FILE, Budget, BudgetFileError, BudgetSpent, DPConfig, DPConfigError, DPStep, epsilon_of,
    per_sample_gradients, poisson_sample, privatize,
)

SMALL = MoEConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
TOLERANCE = 1e-6  # float32: per-sample gradients against a loop of micro-batches of one (max abs difference)


def small_lora(seed: int = 0, family: str = "demo") -> LoraMoE:
    """The demo's family (Mixtral) at SMALL's shape, or a tiny checkpoint of another family."""
    spec = LoraSpec(rank=4, alpha=8, train_head=True, train_shared_mlp=True)
    if family == "demo":
        base = build_model(SMALL, seed=seed)
    else:
        sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
        from family_configs import tiny_config

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=SMALL.vocab_size))
    lora = LoraMoE(base, spec, LoraMoE.make_lora_init(base, spec, seed=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 makes every LoRA's gradient but B's own zero: move off it
        for p in lora.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return lora


@pytest.mark.parametrize("family", ["demo", "qwen2_moe", "deepseek_v3"])
def test_per_sample_gradients_equal_a_loop_over_micro_batches_of_one(family: str) -> None:
    lora = small_lora(family=family)
    model = lora.model
    model.train()
    ids = torch.randint(0, SMALL.vocab_size, (5, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, :10] = -100  # instruction data: only some tokens trained
    grads, losses, _, logits = per_sample_gradients(model, ids, labels, lambda out: out.loss)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(trainable)
    assert any("mlp.experts" in n for n in grads)  # peft's per-expert LoRA: the part opacus cannot do
    worst = 0.0
    for i in range(ids.shape[0]):  # peft's own forward (its parametrization), one sample at a time
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids[i : i + 1], labels=labels[i : i + 1], output_router_logits=True)
        out.loss.backward()
        assert torch.allclose(losses[i], out.loss.detach(), atol=TOLERANCE)
        assert torch.allclose(logits[0][i], out.router_logits[0].detach(), atol=TOLERANCE)
        for name, param in trainable.items():
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            worst = max(worst, float((grads[name][i] - expected).abs().max()))
    print(f"per-sample vs loop of one: max abs difference {worst:.2e}")
    assert worst < TOLERANCE
    expert = next(n for n in grads if "mlp.experts" in n)
    assert float(grads[expert].abs().max()) > 1e-4  # the experts' gradients are not trivially zero
    # shared experts' and dense MLPs' adapters (peft's ParamWrapper on a Linear's weight) are covered too
    shared = [n for n in grads if re.search(r"\.mlp\.(shared_experts?\.)?(gate|up|down)_proj\.lora_B\.", n)]
    assert len(shared) == {"demo": 0, "qwen2_moe": 6, "deepseek_v3": 9}[family]
    assert all(float(grads[n].abs().max()) > 1e-6 for n in shared)
    # the model is left as it was: peft's own forward runs again afterwards
    assert not any("forward" in vars(m) for m in model.modules())


def test_privatize_clips_each_record_and_adds_noise_of_the_stated_scale() -> None:
    per_sample = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.0], [float("nan")]])}
    none = privatize(per_sample, clip_norm=1.0, noise_multiplier=0.0, expected_batch=2.0, generator=torch.Generator())
    # record 0 (norm 5) clipped to norm 1; record 1 has a NaN gradient: it counts as zero
    assert torch.allclose(none["a"], torch.tensor([0.6, 0.8]) / 2)
    assert torch.equal(none["b"], torch.zeros(1))
    big = {"w": torch.zeros(1, 20_000)}
    noisy = privatize(big, clip_norm=0.5, noise_multiplier=2.0, expected_batch=4.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(noisy["w"].std()) - 2.0 * 0.5 / 4.0) < 0.01  # σ·C / expected batch


def test_poisson_sample_has_the_rate_the_accountant_is_told() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [poisson_sample(1000, 0.05, g).numel() for _ in range(200)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2
    assert len(set(sizes)) > 5  # the size varies: Poisson, not fixed-size


def test_epsilon_is_opacus_accountant_for_the_same_sigma_rate_and_steps() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    for accountant, kind in ((RDPAccountant(), "rdp"), (PRVAccountant(), "prv")):
        for _ in range(30):
            accountant.step(noise_multiplier=1.1, sample_rate=0.01)
        for _ in range(20):
            accountant.step(noise_multiplier=0.9, sample_rate=0.02)
        ours = epsilon_of([(1.1, 0.01, 10), (1.1, 0.01, 20), (0.9, 0.02, 20)], 1e-5, kind)
        assert ours == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-6)
        assert ours != pytest.approx(epsilon_of([(1.1, 0.01, 30), (0.9, 0.02, 19)], 1e-5, kind), rel=1e-6)
    assert epsilon_of([], 1e-5) == 0.0


def test_budget_survives_a_restart_and_stops_training_when_spent(tmp_path: Path) -> None:
    config = DPConfig(target_epsilon=1.6, delta=1e-5, clip_norm=1.0, noise_multiplier=1.0)
    budget = Budget.load(tmp_path, config)
    rounds, message = 0, ""
    for _ in range(20):  # a budget that never runs out fails below, not by hanging
        try:
            step = budget.plan(0.02, 10)
        except BudgetSpent as exc:
            message = str(exc)
            break
        budget.spend(step, 10)
        rounds += 1
        budget = Budget.load(tmp_path, config)  # a daemon restart between rounds: only the file is left
    assert rounds == 4  # ε after 1..5 rounds: 1.33, 1.42, 1.49, 1.55, 1.61
    assert "\n" not in message and "DP budget spent" in message and "of 1.6" in message
    spent = budget.spent()
    assert spent == pytest.approx(epsilon_of([(1.0, 0.02, 10)] * rounds, 1e-5))
    assert spent <= 1.6 < epsilon_of([(1.0, 0.02, 10)] * (rounds + 1), 1e-5)
    assert (tmp_path / BUDGET_FILE).is_file()
    # a fresh node (no file) would have the whole budget again: the file is what remembers
    assert Budget.load(tmp_path / "other", config).spent() == 0.0


def test_sigma_calibrated_from_the_target_is_kept_across_restarts(tmp_path: Path) -> None:
    config = DPConfig(target_epsilon=4.0, delta=1e-5, clip_norm=1.0, rounds=3)
    budget = Budget.load(tmp_path, config)
    step = budget.plan(0.05, 20)
    budget.spend(step, 20)
    again = Budget.load(tmp_path, config)
    assert again.noise_multiplier == step.noise_multiplier
    for _ in range(2):
        again.spend(again.plan(0.05, 20), 20)
    assert again.spent() == pytest.approx(4.0, rel=0.02)  # spent over exactly `rounds` rounds
    with pytest.raises(BudgetSpent):
        again.plan(0.05, 20)


def test_a_damaged_budget_file_is_refused_not_reset(tmp_path: Path) -> None:
    (tmp_path / BUDGET_FILE).write_text("{not json")
    with pytest.raises(BudgetFileError, match="never delete it"):
        Budget.load(tmp_path, DPConfig(1.0, 1e-5, 1.0, 1.0))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp": "yes"}, "node config dp 'yes': expected on or off"),
        ({"dp": "on"}, "node config dp-target-epsilon is missing"),
        ({"dp": "on", "dp-target-epsilon": "-1"}, "dp-target-epsilon '-1': expected a number > 0"),
        ({"dp": "on", "dp-target-epsilon": "inf"}, "dp-target-epsilon 'inf'"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-delta": "1"}, "dp-delta '1': expected a number in (0, 1)"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-clip-norm": "0"}, "dp-clip-norm '0'"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-noise-multiplier": "0"}, "dp-noise-multiplier 0"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-noise-multiplier": "nan"}, "dp-noise-multiplier 'nan'"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-rounds": "0"}, "dp-rounds '0'"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-accountant": "gdp"}, "dp-accountant 'gdp'"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-epsilon": "4"}, "node config dp-epsilon: unknown DP key"),
        ({"dp": "on", "dp-target-epsilon": "8", "dp-large-batch": "yes"}, "dp-large-batch 'yes': expected on or off"),
    ],
)
def test_bad_dp_config_is_refused_in_one_line(config: dict[str, str], message: str) -> None:
    with pytest.raises(DPConfigError) as info:
        DPConfig.from_node_config(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dp_is_off_by_default_and_on_reads_every_key() -> None:
    assert DPConfig.from_node_config({}) is None
    assert DPConfig.from_node_config({"dp": "off", "dp-target-epsilon": "x"}) is None
    on = DPConfig.from_node_config({"dp": "on", "dp-target-epsilon": "8", "dp-delta": "1e-6", "dp-clip-norm": "0.5",
                                    "dp-noise-multiplier": "1.2", "dp-rounds": "4", "dp-accountant": "prv",
                                    "dp-large-batch": "off"})
    assert on == DPConfig(8.0, 1e-6, 0.5, 1.2, 4, "prv", large_batch=False)
    assert DPConfig.from_node_config({"dp": "on", "dp-target-epsilon": "8"}).large_batch


def test_a_large_batch_round_draws_the_same_records_in_one_step() -> None:
    large, small = DPConfig(8.0, 1e-5, 1.0), DPConfig(8.0, 1e-5, 1.0, large_batch=False)
    assert large.round_shape(14, 8, 1.0, "sgd") == (1, 112, 14.0)  # SGD: the update moves as far as 14 steps
    assert large.round_shape(14, 8, 1e-3, "adamw") == (1, 112, 1e-3)
    assert large.round_shape(1, 8, 1.0, "sgd") == (1, 8, 1.0)
    assert small.round_shape(14, 8, 1.0, "sgd") == (14, 8, 1.0)


def test_a_dp_step_over_more_records_than_a_chunk_equals_the_unchunked_privatized_gradient(monkeypatch) -> None:
    """dp_step clips DP_CHUNK records at a time; the noisy gradient is the one privatize gives for
    the whole sample at once (same generator state), to float rounding."""
    import client.trainer as trainer

    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (40, 12), generator=torch.Generator().manual_seed(3))
    rows = torch.arange(40)
    monkeypatch.setattr(trainer, "poisson_sample", lambda n, rate, generator: rows)
    monkeypatch.setattr(trainer, "DP_CHUNK", 16)  # 40 records: chunks of 16, 16 and 8
    model = lora.model
    precision = select_precision("fp32", "cpu")
    step = DPStep(0.7, 0.05, 1.0, torch.Generator().manual_seed(9))
    config = TrainConfig(local_steps=1, batch_size=40, lr=1.0, seed=0, min_expert_tokens=0, dp=step)
    losses: list[float] = []
    trainer.dp_step(model, blocks, blocks, config, step, lambda out: out.loss, precision, families.top_k(model.config), losses)
    chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads, model_losses, aux_losses, _ = per_sample_gradients(model, blocks, blocks, lambda out: out.loss)
    whole = privatize(grads, 0.05, 0.7, 40, torch.Generator().manual_seed(9))
    assert chunked.keys() == whole.keys()
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-5, atol=1e-7)
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
    assert losses[0] == pytest.approx(float((model_losses - aux_coef * aux_losses).mean()), rel=1e-5)
    clipped = privatize(grads, 0.05, 0.0, 40, torch.Generator())  # the clip binds: noise-free, the sum is below 40 * clip / 40
    assert 0 < math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values())) <= 0.05 + 1e-6


def test_dp_training_lowers_held_out_loss() -> None:
    """A few DP-SGD steps at a moderate ε still learn: held-out loss falls (in-process, no Flower)."""
    lora = small_lora()
    g = torch.Generator().manual_seed(5)
    pattern = torch.randint(0, SMALL.vocab_size, (8,), generator=g)
    blocks = pattern.repeat(64, 3)[:, :24]  # (64, 24) a repetitive "domain" the base does not know
    held_out = pattern.roll(3).repeat(4, 3)[:, :24]
    precision = select_precision("fp32", "cpu")

    def loss() -> float:
        lora.model.eval()
        with torch.no_grad():
            return float(lora.model(input_ids=held_out, labels=held_out).loss)

    before, start = loss(), lora.get_state()
    step = DPStep(noise_multiplier=0.8, clip_norm=1.0, sample_rate=8 / 64, generator=torch.Generator().manual_seed(0))
    result = train_local(lora, start, blocks, TrainConfig(local_steps=15, batch_size=8, lr=0.02, seed=0,
                                                          min_expert_tokens=0, dp=step), precision)
    lora.set_state({k: start[k] + result.delta.get(k, 0) for k in start})
    after = loss()
    eps = epsilon_of([(0.8, 8 / 64, 15)], 1e-5)
    print(f"DP-SGD 15 steps at ε {eps:.2f}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.1
    assert math.isfinite(result.train_loss) and result.num_examples == 15 * 8


def test_every_dp_node_config_key_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in DPConfig.KEYS:
        assert f"| `{key}` |" in readme, key
