"""A member's frozen base in int8 or NF4 (model/quantize.py): the weights' memory, what they cost
in loss, and that the LoRA on top trains exactly as the trainable state expects."""

from __future__ import annotations

import pytest
import torch

from model.base import load_base
from model.lora import LoraMoE
from model.quantize import QuantizationError, quantize_base, base_weight_bytes


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def _loss(lora: LoraMoE, ids: torch.Tensor) -> float:
    lora.model.eval()
    with torch.no_grad():
        return float(lora.model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("mode, at_most, loss_tolerance", [("int8", 0.30, 0.01), ("nf4", 0.20, 0.05)])
def test_a_quantized_base_takes_a_fraction_of_the_memory_and_costs_little_loss(
    tiny_base_path, mode: str, at_most: float, loss_tolerance: float
) -> None:
    plain = load_base(tiny_base_path).with_lora()
    quantized = load_base(tiny_base_path).with_lora()
    ids = _batch(plain.model.config.vocab_size)
    report = quantize_base(quantized.model, mode)
    # fp32 weights of 2+ dims: int8 keeps 1 byte each plus a scale per row, NF4 half a byte plus one per 64
    assert report.weights > 0 and report.bytes_after <= at_most * report.bytes_before
    assert base_weight_bytes(quantized.model) < base_weight_bytes(plain.model) - 0.6 * report.bytes_before
    plain_loss, quantized_loss = _loss(plain, ids), _loss(quantized, ids)
    assert abs(quantized_loss - plain_loss) <= loss_tolerance * plain_loss
    assert quantized_loss != plain_loss  # the weights really are the dequantized codes
    assert quantized.get_state().keys() == plain.get_state().keys()
    for name, tensor in quantized.get_state().items():
        assert tensor.dtype == plain.get_state()[name].dtype  # the trainable state stays as it was


def test_the_lora_trains_on_a_quantized_base_step_after_step(tiny_base_path) -> None:
    lora = load_base(tiny_base_path).with_lora()
    quantize_base(lora.model, "int8")
    ids = _batch(lora.model.config.vocab_size)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-2)
    before = lora.get_state()
    losses = []
    for _ in range(4):  # every step registers and removes peft's expert parametrization again
        lora.model.train()
        optimizer.zero_grad()
        loss = lora.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    moved = {name for name, t in lora.get_state().items() if not torch.equal(t, before[name])}
    assert any(".experts." in n for n in moved) and any("self_attn" in n for n in moved)
    experts = [m for n, m in lora.model.named_modules() if n.endswith("mlp.experts.base_layer.base_layer")
               or (n.endswith("mlp.experts") and not hasattr(m, "base_layer"))]
    assert experts and all(not hasattr(m, "parametrizations") for m in experts)  # nothing left behind
    for module in experts:
        assert module.gate_up_proj.numel() == 0  # between forwards only the codes are held


def test_merging_for_evaluation_leaves_a_quantized_base_alone(tiny_base_path) -> None:
    lora = load_base(tiny_base_path).with_lora()
    quantize_base(lora.model, "int8")
    ids = _batch(lora.model.config.vocab_size)
    state = {n: t + 0.01 for n, t in lora.get_state().items()}
    lora.set_state(state)
    unmerged = _loss(lora, ids)
    with lora.merged():
        assert _loss(lora, ids) == pytest.approx(unmerged, rel=1e-5)
    assert _loss(lora, ids) == unmerged


def test_an_unknown_quantization_is_refused_by_name(tiny_base_path) -> None:
    lora = load_base(tiny_base_path).with_lora()
    with pytest.raises(QuantizationError, match="'int4' is not one of none, int8, nf4"):
        quantize_base(lora.model, "int4")


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_the_shared_mlp_adapters_train_on_a_quantized_base(family: str) -> None:
    """A shared expert's or dense Linear under peft's `ParamWrapper`: its weight is dequantized by
    the wrapper's hook while it runs, and only the adapter moves."""
    from transformers import AutoModelForCausalLM

    from model.families import role_of
    from model.lora import LoraSpec
    from family_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64))
    spec = LoraSpec(rank=4, alpha=8, train_shared_mlp=True)
    lora = LoraMoE(model, spec, LoraMoE.make_lora_init(model, spec, seed=1))
    shared = [n for n in lora.names if n.endswith(".lora_B") and role_of(n) in ("shared_expert", "dense_mlp")]
    assert len(shared) == (6 if family == "qwen2_moe" else 9)
    quantize_base(lora.model, "int8")
    ids = _batch(64)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-2)
    before = lora.get_state()
    losses = []
    for _ in range(3):
        lora.model.train()
        optimizer.zero_grad()
        loss = lora.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(lora.get_state()[n], before[n]) for n in shared)
    for name in shared:  # between forwards the Linear holds only the codes, and no parametrization is left
        linear = lora.model.get_base_model().get_submodule(name.removesuffix(".lora_B")).get_base_layer()
        assert linear.weight.numel() == 0 and not hasattr(linear, "parametrizations"), name
