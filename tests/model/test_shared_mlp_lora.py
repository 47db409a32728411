"""Shared experts and dense MLPs get a trained adapter (model/lora.py `train_shared_mlp`): named,
classed and aggregated as shared tensors, trained by a local step, folded by a merged evaluation,
and absent, with nothing else changed, where a base has none (a Mixtral) or predates them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from aggregation.fedavg import Update, aggregate
from client.trainer import TrainConfig, train_local
from model.base import MANIFEST, load_base, save_base
from model.families import role_of
from model.lora import EXPERT_PARAMETERS, LoraMoE, LoraSpec, expert_of, kind_of
from model.precision import select_precision
from family_configs import tiny_config

VOCAB = 64
SPEC = LoraSpec(rank=4, alpha=8, train_shared_mlp=True)
PROJ = ("gate_proj", "up_proj", "down_proj")
# family -> the adapters' names it must have: Qwen2-MoE a shared expert per layer; DeepSeek-V3 a
# dense layer 0 and shared experts in its MoE layers 1, 2; Qwen3-MoE with `mlp_only_layers` = [0]
EXPECTED = {
    "qwen2_moe": {f"model.layers.{l}.mlp.shared_expert.{p}.lora_B" for l in (0, 1) for p in PROJ},
    "deepseek_v3": {f"model.layers.0.mlp.{p}.lora_B" for p in PROJ}
    | {f"model.layers.{l}.mlp.shared_experts.{p}.lora_B" for l in (1, 2) for p in PROJ},
    "qwen3_moe_dense": {f"model.layers.0.mlp.{p}.lora_B" for p in PROJ},
}


def tiny_model(family: str) -> PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config(family.removesuffix("_dense"), vocab_size=VOCAB)
    if family.endswith("_dense"):
        config.mlp_only_layers = [0]
    return AutoModelForCausalLM.from_config(config)


def tiny_lora(family: str, spec: LoraSpec = SPEC) -> LoraMoE:
    model = tiny_model(family)
    return LoraMoE(model, spec, LoraMoE.make_lora_init(model, spec, seed=1))


def shared_mlp(names: object) -> set[str]:
    return {n for n in names if n.endswith(".lora_B") and role_of(n) in ("shared_expert", "dense_mlp")}  # type: ignore[attr-defined]


def blocks(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_shared_expert_and_dense_projection_gets_one_adapter_aggregated_by_tokens(family: str) -> None:
    lora = tiny_lora(family)
    assert shared_mlp(lora.names) == EXPECTED[family]
    model = lora.model.get_base_model()
    for name in EXPECTED[family]:
        assert kind_of(name) == "attention" and expert_of(name) is None, name
        linear = model.get_submodule(name.removesuffix(".lora_B")).get_base_layer()
        assert lora.shapes()[name] == (linear.out_features, SPEC.rank), name
        assert lora.shapes()[name] != tuple(linear.weight.shape)
    if family == "qwen2_moe":  # its shared expert's gate trains in full, as the router does
        assert {n for n in lora.names if "shared_expert_gate" in n} == {
            f"model.layers.{l}.mlp.shared_expert_gate.weight" for l in (0, 1)}
    off = tiny_lora(family, dataclasses.replace(SPEC, train_shared_mlp=False))
    assert shared_mlp(off.names) == set() and set(lora.names) - set(off.names) == EXPECTED[family]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_turning_the_adapters_on_leaves_every_other_frozen_a_as_it_was(family: str) -> None:
    model = tiny_model(family)
    off = LoraMoE.make_lora_init(model, dataclasses.replace(SPEC, train_shared_mlp=False), seed=1)
    on = LoraMoE.make_lora_init(model, SPEC, seed=1)
    assert all(torch.equal(on[name], a) for name, a in off.items())
    added = {name.replace(".lora_A", ".lora_B") for name in set(on) - set(off)}
    assert added == EXPECTED.get(family, set())
    if family == "mixtral":  # the demo's family: no shared MLP, so the same state and the same adapter config
        lora = LoraMoE(model, SPEC, on)
        assert set(lora.model.peft_config["default"].target_parameters) == set(EXPERT_PARAMETERS)
        assert shared_mlp(lora.names) == set()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_one_local_step_moves_every_shared_mlp_adapter(family: str) -> None:
    lora = tiny_lora(family)
    start = lora.get_state()
    config = TrainConfig(local_steps=1, batch_size=4, lr=0.1, seed=0, min_expert_tokens=1, optimizer="sgd")
    result = train_local(lora, start, blocks(8), config, select_precision("fp32", "cpu"))
    for name in EXPECTED[family]:
        assert torch.all(start[name] == 0), name  # B starts at zero: the adapter starts as the base
        assert float(result.delta[name].abs().max()) > 1e-6, name  # a real gradient through the frozen A
    if family == "qwen2_moe":
        assert float(result.delta["model.layers.0.mlp.shared_expert_gate.weight"].abs().max()) > 1e-6


def test_two_members_shared_mlp_updates_are_averaged_by_their_tokens_exactly() -> None:
    lora = tiny_lora("deepseek_v3")
    start = lora.get_state()
    fp32 = select_precision("fp32", "cpu")
    results = [train_local(lora, start, blocks(12, seed), TrainConfig(1, batch, 0.1, 0, 1, optimizer="sgd"), fp32)
               for seed, batch in ((1, 2), (2, 6))]
    updates = [Update(f"m{i}", r.delta, r.num_tokens, r.expert_tokens) for i, r in enumerate(results)]
    (a, n_a), (b, n_b) = ((r.delta, r.num_tokens) for r in results)
    assert (n_a, n_b) == (32, 96)
    mean = aggregate(updates, expert_of)
    for name in EXPECTED["deepseek_v3"]:
        expected = ((a[name].double() * n_a + b[name].double() * n_b) / (n_a + n_b)).float()
        assert torch.equal(mean[name], expected), name
        assert not torch.allclose(mean[name], (a[name] + b[name]) / 2), name  # the weights matter here


def test_a_merged_evaluation_folds_the_shared_mlp_adapters_and_gives_their_weights_back() -> None:
    lora = tiny_lora("deepseek_v3")
    g = torch.Generator().manual_seed(3)
    lora.set_state({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in lora.get_state().items()})
    before = {k: v.clone() for k, v in lora.model.state_dict().items()}
    tokens = blocks(2, seed=4)
    lora.model.eval()
    with torch.no_grad():
        adapted = lora.model(input_ids=tokens).logits
        with lora.merged() as model:
            merged = model(input_ids=tokens).logits
            dense = model.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
            assert dense.merged and not torch.equal(dense.get_base_layer().weight, before[
                "base_model.model.model.layers.0.mlp.gate_proj.base_layer.weight"])
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in lora.model.state_dict().items())


def test_a_base_built_before_the_shared_mlp_adapters_loads_and_trains_without_them(tiny_base_path: Path,
                                                                                   tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    old = tmp_path / "old"
    save_base(old, tiny_model("deepseek_v3"), tokenizer, dataclasses.replace(SPEC, train_shared_mlp=False), seed=0)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["lora"]["train_shared_mlp"]  # what a base written before the setting holds
    (old / MANIFEST).write_text(json.dumps(manifest))
    base = load_base(old)
    assert not base.spec.train_shared_mlp and not any("mlp.gate_proj" in n for n in base.lora_init)
    lora = base.with_lora()
    assert shared_mlp(lora.names) == set()
    start = lora.get_state()
    result = train_local(lora, start, blocks(8), TrainConfig(1, 4, 0.1, 0, 1, optimizer="sgd"),
                         select_precision("fp32", "cpu"))
    assert set(result.delta) <= set(start) and any(float(d.abs().max()) > 0 for d in result.delta.values())
    with pytest.raises(ValueError, match=r"^LoRA init lacks 9 tensors, first: model\.layers\.0\.mlp\.down_proj\.lora_A$"):
        LoraMoE(tiny_model("deepseek_v3"), SPEC, base.lora_init)
