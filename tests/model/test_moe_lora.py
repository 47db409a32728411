from __future__ import annotations

import pytest
import torch

from model.precision import PrecisionError, select_precision
from client.trainer import TrainConfig, train_local
from model.base import BaseModelError, load_base
from model.lora import LoraMoE, LoraSpec, _mergeable, expert_of
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from model.moe import MoEConfig, build_model, routed_token_counts

SMALL = MoEConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def small_lora(spec: LoraSpec = LoraSpec(rank=4, alpha=8)) -> LoraMoE:
    base = build_model(SMALL, seed=0)
    return LoraMoE(base, spec, LoraMoE.make_lora_init(base, spec, seed=1))


def test_default_moe_is_top2_of_8_and_trainable_fraction_is_small() -> None:
    default = MoEConfig()
    assert (default.num_experts, default.top_k) == (8, 2)
    lora = small_lora()
    fraction = lora.trainable_fraction()
    print(f"trainable fraction: {fraction:.4f}")
    assert 0.005 < fraction < 0.25
    # only lora_B and the router copy train; every frozen A stays frozen
    for name, p in lora.model.named_parameters():
        if p.requires_grad:
            assert "lora_B" in name or "modules_to_save" in name, name


def test_per_expert_state_slices_touch_only_that_expert() -> None:
    lora = small_lora()
    name = "model.layers.1.mlp.experts.down_proj.lora_B.e5"
    assert expert_of(name) == "1:5"
    lora.set_state({name: torch.ones(lora.shapes()[name])})
    wrapper = next(m for n, m in lora.model.named_modules() if n.endswith("layers.1.mlp.experts") and hasattr(m, "get_delta_weight"))
    delta = wrapper.get_delta_weight("default")  # (E, ...) per-expert delta of down_proj
    nonzero = [e for e in range(delta.shape[0]) if delta[e].abs().sum() > 0]
    assert nonzero == [5]
    assert torch.equal(lora.get_state()[name], torch.ones(lora.shapes()[name]))


def test_state_round_trip_and_unknown_names_refused() -> None:
    lora = small_lora()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in lora.shapes().items()}
    lora.set_state(state)
    assert all(torch.equal(lora.get_state()[k], v) for k, v in state.items())
    with pytest.raises(KeyError, match="unknown trainable tensor"):
        lora.set_state({"model.layers.9.nope": torch.zeros(1)})


def test_routed_token_counts() -> None:
    logits = (torch.tensor([[5.0, 4.0, 0.0], [0.0, 4.0, 5.0]]),)
    assert routed_token_counts(logits, top_k=2).tolist() == [[1, 2, 1]]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_local_round_trains_routed_experts_under_each_cpu_precision(precision: str) -> None:
    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    start = lora.get_state()
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2, seed=0, min_expert_tokens=1)
    result = train_local(lora, start, blocks, cfg, select_precision(precision, "cpu"))
    assert result.num_tokens == 3 * 4 * 32
    # every token goes to top_k=2 experts in each of the 2 layers
    per_layer = [sum(n for g, n in result.expert_tokens.items() if g.startswith(f"{layer}:")) for layer in range(2)]
    assert per_layer == [2 * result.num_tokens] * 2
    assert all(torch.isfinite(d).all() for d in result.delta.values())
    moved = [k for k, d in result.delta.items() if d.abs().sum() > 0]
    assert any("self_attn" in k for k in moved) and any(expert_of(k) for k in moved)
    assert any(k.endswith("mlp.gate.weight") for k in moved)


def test_experts_below_min_tokens_are_not_sent() -> None:
    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(local_steps=1, batch_size=2, lr=1e-2, seed=0, min_expert_tokens=10**9)
    result = train_local(lora, lora.get_state(), blocks, cfg, select_precision("bf16", "cpu"))
    assert result.experts_sent == 0 and result.experts_skipped > 0
    assert not any(expert_of(k) for k in result.delta)
    assert any("self_attn" in k for k in result.delta)


def test_precision_selection_follows_the_device() -> None:
    cpu = select_precision("auto", "cpu")
    assert cpu.autocast_dtype == torch.bfloat16 and not cpu.grad_scaler
    gpu_bf16 = select_precision("auto", "auto", cuda_available=True, cuda_bf16=True)
    assert gpu_bf16.device.type == "cuda" and gpu_bf16.autocast_dtype == torch.bfloat16
    old_gpu = select_precision("auto", "auto", cuda_available=True, cuda_bf16=False)
    assert old_gpu.autocast_dtype == torch.float16 and old_gpu.grad_scaler
    assert select_precision("fp32", "cpu").autocast_dtype is None
    with pytest.raises(PrecisionError, match="fp16.*CUDA"):
        select_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="bf16"):
        select_precision("bf16", "auto", cuda_available=True, cuda_bf16=False)
    with pytest.raises(PrecisionError, match="not one of"):
        select_precision("fp8")


def test_fp16_grad_scaler_path_trains() -> None:
    """The path a GPU without bf16 takes; on a CPU-only machine fp16 autocast runs on the CPU."""
    from model.precision import Precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    precision = Precision(device, torch.float16, grad_scaler=True)
    result = train_local(lora, lora.get_state(), blocks, TrainConfig(3, 4, 1e-2, 0, 1), precision)
    assert all(torch.isfinite(d).all() for d in result.delta.values())
    assert any(d.abs().sum() > 0 for d in result.delta.values())
    if torch.cuda.is_available():  # and the automatic choice on this GPU trains too
        auto = select_precision("auto")
        assert auto.device.type == "cuda"
        result = train_local(lora, lora.get_state(), blocks, TrainConfig(3, 4, 1e-2, 0, 1), auto)
        assert any(d.abs().sum() > 0 for d in result.delta.values())


def test_base_directory_is_checked_against_its_sha256(tiny_base_path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(tiny_base_path, copy)
    base = load_base(copy)
    with pytest.raises(BaseModelError, match="not the round's base"):
        load_base(copy, expected_sha256="0" * 64)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match=r"model.safetensors: sha256 mismatch"):
        load_base(copy)
    assert base.spec.rank == 4


def test_consortium_balance_replaces_the_members_own_in_the_trainer(tiny_base_path) -> None:
    """The router trains against the consortium's load when one is given, deterministically."""
    base = load_base(tiny_base_path)
    lora = base.with_lora()
    start = lora.get_state()
    blocks = torch.randint(0, base.model.config.vocab_size, (16, 32))
    layers, experts = base.model.config.num_hidden_layers, base.model.config.num_local_experts
    overloaded = torch.zeros(layers, experts)
    overloaded[:, :2] = 0.5  # the consortium sends everything to experts 0 and 1
    precision = select_precision("fp32", "cpu")

    def router_delta(load) -> dict[str, torch.Tensor]:  # noqa: ANN001
        cfg = TrainConfig(local_steps=2, batch_size=4, lr=1e-2, seed=0, min_expert_tokens=1,
                          expert_load=load, balance_weight=0.25)
        delta = train_local(lora, start, blocks, cfg, precision).delta
        return {k: v for k, v in delta.items() if k.endswith("gate.weight") or ".gate." in k}

    own, consortium, again = router_delta(None), router_delta(overloaded), router_delta(overloaded)
    assert own and set(own) == set(consortium)
    assert all(torch.equal(consortium[k], again[k]) for k in consortium)
    assert any(not torch.equal(own[k], consortium[k]) for k in own)


def test_local_sgd_is_a_gradient_step_and_adamw_is_not() -> None:
    """sgd: one step's delta is -lr x the (clipped) gradient, so it scales with lr; AdamW's first
    step is about lr x sign(gradient) per coordinate and does not."""
    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    start = lora.get_state()
    fp32 = select_precision("fp32", "cpu")

    def delta(optimizer: str, lr: float) -> torch.Tensor:
        cfg = TrainConfig(local_steps=1, batch_size=2, lr=lr, seed=0, min_expert_tokens=0, optimizer=optimizer)
        result = train_local(lora, start, blocks, cfg, fp32)
        return torch.cat([d.flatten() for _, d in sorted(result.delta.items())])

    sgd_small, sgd_big = delta("sgd", 0.01), delta("sgd", 0.04)
    assert sgd_small.abs().sum() > 0
    torch.testing.assert_close(sgd_big, 4 * sgd_small, rtol=1e-3, atol=1e-7)
    # AdamW's first step is lr x g / (|g| + eps): every coordinate with a real gradient moves by ~lr
    adam = delta("adamw", 0.01)
    moved = adam.abs() > 1e-4
    assert moved.float().mean() > 0.5
    torch.testing.assert_close(adam[moved].abs().median(), torch.tensor(0.01), rtol=0.02, atol=0.0)
    # sgd's coordinates move by their own gradient's size, which differs by orders of magnitude
    sizes = sgd_small[sgd_small != 0].abs()
    assert sizes.max() / sizes.min() > 100


def test_an_unknown_local_optimizer_is_refused() -> None:
    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(local_steps=1, batch_size=2, lr=0.01, seed=0, min_expert_tokens=0, optimizer="lion")
    with pytest.raises(ValueError, match="local-opt must be one of adamw, sgd, not 'lion'"):
        train_local(lora, lora.get_state(), blocks, cfg, select_precision("fp32", "cpu"))


def test_gradients_added_by_name_land_in_their_own_slots_and_read_back_exactly() -> None:
    """add_to_grad writes named tensors (per-expert columns of the fused lora_B included) into the
    parameters' gradients where get_grad reads them: SCAFFOLD's correction depends on it."""
    lora = small_lora()
    g = torch.Generator().manual_seed(3)
    named = {k: torch.randn(s, generator=g) for k, s in lora.shapes().items()}
    lora.model.zero_grad(set_to_none=True)
    lora.add_to_grad(named)
    lora.add_to_grad({k: v for k, v in named.items() if expert_of(k) == "1:5"})  # one expert twice
    read = lora.get_grad()
    assert all(torch.equal(read[k], 2 * v if expert_of(k) == "1:5" else v) for k, v in named.items())
    with pytest.raises(KeyError, match="unknown trainable tensor"):
        lora.add_to_grad({"model.layers.9.nothing": torch.zeros(1)})


def test_a_scaffold_step_follows_the_clipped_gradient_plus_the_correction() -> None:
    """One plain SGD step with a correction c - c_i moves the state by -lr (g + c - c_i), g the
    clipped gradient the member reports as its next c_i (`mean_gradient`)."""
    lora = small_lora()
    start = lora.get_state()
    blocks = torch.randint(0, SMALL.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(4)
    correction = {k: 0.01 * torch.randn(s, generator=g) for k, s in lora.shapes().items()}
    precision = select_precision("fp32", "cpu")
    config = TrainConfig(local_steps=1, batch_size=4, lr=0.5, seed=0, min_expert_tokens=0, optimizer="sgd",
                         correction=correction, track_gradient=True)
    result = train_local(lora, start, blocks, config, precision)
    assert result.mean_gradient is not None and set(result.mean_gradient) == set(start)
    assert sum(float(v.pow(2).sum()) for v in result.mean_gradient.values()) ** 0.5 <= 1.0 + 1e-5  # clipped
    for name, delta in result.delta.items():
        expected = -0.5 * (result.mean_gradient[name] + correction[name])
        assert torch.allclose(delta, expected, atol=1e-6), name
    plain = train_local(lora, start, blocks, TrainConfig(1, 4, 0.5, 0, 0, optimizer="sgd"), precision)
    assert plain.mean_gradient is None
    assert all(torch.allclose(plain.delta[k], -0.5 * result.mean_gradient[k], atol=1e-6) for k in plain.delta)


def test_a_merged_evaluation_matches_the_adapters_and_gives_every_base_weight_back_bit_for_bit() -> None:
    lora = small_lora(LoraSpec(rank=4, alpha=8, train_head=True))
    g = torch.Generator().manual_seed(3)
    lora.set_state({k: 0.05 * torch.randn(s, generator=g) for k, s in lora.shapes().items()})
    before = {k: v.clone() for k, v in lora.model.state_dict().items()}
    tokens = torch.randint(0, SMALL.vocab_size, (4, 16), generator=g)
    lora.model.eval()
    with torch.no_grad():
        adapted = lora.model(input_ids=tokens).logits
        with lora.merged() as model:
            merged = model(input_ids=tokens).logits
            # the experts' weights now hold their adapters; attention and the (tied) head run theirs
            experts = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.experts") and hasattr(m, "get_delta_weight"))
            down = next(k for k in before if k.endswith("layers.0.mlp.experts.base_layer.base_layer.down_proj"))
            assert experts.merged and not torch.equal(experts.get_base_layer().down_proj, before[down])
            linear = [m for m in model.modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)]
            assert linear and not any(m.merged for m in linear)
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "experts" not in k)
        after = lora.model(input_ids=tokens).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert torch.equal(after, adapted)  # the adapters run again, on the original weights
    assert all(torch.equal(before[k], v) for k, v in lora.model.state_dict().items())
    assert not any(getattr(m, "merged", False) for m in lora.model.modules())


def test_only_plain_float_weights_on_the_cpu_are_merged() -> None:
    plain = torch.nn.Parameter(torch.zeros(4, 4))
    assert _mergeable(plain) and _mergeable(torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16)))
    assert not _mergeable(torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False))  # quantized
    assert not _mergeable(torch.nn.Parameter(torch.empty(4, 4, device="meta")))  # off the CPU
    assert not _mergeable(plain.data) and not _mergeable(None)


def test_a_non_finite_adapter_is_evaluated_unmerged_so_its_loss_stays_non_finite() -> None:
    lora = small_lora()
    name = "model.layers.0.mlp.experts.down_proj.lora_B.e0"
    lora.set_state({name: torch.full(lora.shapes()[name], float("nan"))})
    tokens = torch.arange(32).reshape(2, 16)
    with torch.no_grad(), lora.merged() as model:
        logits = model(input_ids=tokens).logits
    assert not torch.isfinite(logits).all()
    assert not any(getattr(m, "merged", False) for m in lora.model.modules())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_evaluation_loss_is_the_mean_next_token_cross_entropy(autocast: torch.dtype | None) -> None:
    from model.moe import evaluate_loss

    lora = small_lora()
    blocks = torch.randint(0, SMALL.vocab_size, (5, 12), generator=torch.Generator().manual_seed(4))
    lora.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = lora.model(input_ids=blocks).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    loss = evaluate_loss(lora.model, blocks, batch_size=2, device=torch.device("cpu"), autocast_dtype=autocast)
    assert loss == pytest.approx(float(expected), rel=1e-6)


def test_labels_restrict_the_loss_to_the_trained_tokens() -> None:
    """Instruction and chat data train on the answers only: the loss train_local reports for its
    first step is the model's loss on the labelled tokens of the batch it drew, not on all of them."""
    from model.tokenizer import IGNORE, batches

    blocks = torch.randint(0, SMALL.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    labels = blocks.clone()
    labels[:, :24] = IGNORE  # a long prompt, a short answer
    cfg = TrainConfig(local_steps=1, batch_size=4, lr=1e-2, seed=0, min_expert_tokens=1)
    fp32 = select_precision("fp32", "cpu")
    result = train_local(small_lora(), small_lora().get_state(), blocks, cfg, fp32, labels=labels)

    rows = next(batches(torch.arange(16).unsqueeze(1), 4, seed=0)).squeeze(1)
    model = small_lora().model
    coef = float(model.config.router_aux_loss_coef)
    with torch.no_grad():
        masked = model(input_ids=blocks[rows], labels=labels[rows], output_router_logits=True)
        whole = model(input_ids=blocks[rows], labels=blocks[rows], output_router_logits=True)
    assert result.train_loss == pytest.approx(float(masked.loss) - coef * float(masked.aux_loss), abs=1e-5)
    assert abs(float(whole.loss) - float(masked.loss)) > 1e-3
    with pytest.raises(ValueError, match="labels"):
        train_local(small_lora(), small_lora().get_state(), blocks, cfg, fp32, labels=labels[:, :8])
