"""Server optimizers against steps computed by hand, per-tensor state, and strict state checks."""

from __future__ import annotations

import math

import pytest
import torch

from aggregation.server_opt import ServerOptError, ServerOptimizer, check_state

A = "model.layers.0.self_attn.q_proj.lora_B.weight"  # an attention adapter
E0 = "model.layers.0.mlp.experts.down_proj.lora_B.e0"  # one routed expert
X0 = {A: torch.tensor([1.0, -2.0, 0.5]), E0: torch.tensor([0.25, 0.25])}
D1 = {A: torch.tensor([0.1, -0.2, 0.0]), E0: torch.tensor([0.5, -0.5])}
D2 = {A: torch.tensor([-0.3, 0.1, 0.2])}  # the expert not trained in round 2


def run(opt: ServerOptimizer, *deltas: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    state, opt_state = dict(X0), {}
    for delta in deltas:
        state, opt_state = opt.step(state, delta, opt_state)
    return state, opt_state


def close(tensor: torch.Tensor, expected: list[float]) -> None:
    assert torch.allclose(tensor.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7), (tensor, expected)


def test_fedavg_with_unit_lr_adds_the_mean_update_exactly() -> None:
    state, opt_state = run(ServerOptimizer(), D1, D2)
    assert torch.equal(state[A], X0[A] + D1[A] + D2[A])
    assert torch.equal(state[E0], X0[E0] + D1[E0])
    assert opt_state == {}


def test_fedavgm_accumulates_momentum() -> None:
    eta, beta = 0.5, 0.9
    state, opt_state = run(ServerOptimizer("fedavgm", lr=eta, momentum=beta), D1, D2)
    for i in range(3):
        v1 = D1[A][i].item()
        v2 = beta * v1 + D2[A][i].item()
        close(state[A][i : i + 1], [X0[A][i].item() + eta * v1 + eta * v2])
        close(opt_state[f"v/{A}"][i : i + 1], [v2])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_steps_match_the_hand_computed_ones(name: str) -> None:
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    state, opt_state = run(ServerOptimizer(name, lr=eta, beta1=b1, beta2=b2, tau=tau), D1, D2)
    for i in range(3):
        x = X0[A][i].item()
        m = v = 0.0
        for t, d in ((1, D1[A][i].item()), (2, D2[A][i].item())):
            m = b1 * m + (1 - b1) * d
            if name == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * (1.0 if v > d * d else -1.0 if v < d * d else 0.0)
            x += eta * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + tau)
        close(state[A][i : i + 1], [x])
        close(opt_state[f"m/{A}"][i : i + 1], [m])
        close(opt_state[f"v/{A}"][i : i + 1], [v])
    assert int(opt_state[f"t/{A}"]) == 2


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_an_untrained_expert_keeps_its_value_and_state(name: str) -> None:
    opt = ServerOptimizer(name, lr=0.1)
    after_1, state_1 = run(opt, D1)
    after_2, state_2 = opt.step(after_1, D2, state_1)
    assert torch.equal(after_2[E0], after_1[E0])
    for key in [k for k in state_1 if k.endswith(f"/{E0}")]:
        assert torch.equal(state_2[key], state_1[key]), key
    assert not torch.equal(after_2[A], after_1[A])
    if name != "fedavgm":  # its own step count: trained once, so its next step is its second
        assert int(state_2[f"t/{E0}"]) == 1 and int(state_2[f"t/{A}"]) == 2
        after_3, state_3 = opt.step(after_2, {E0: D1[E0]}, state_2)
        assert int(state_3[f"t/{E0}"]) == 2


def test_the_first_adaptive_step_is_about_lr_per_coordinate() -> None:
    # bias correction: m̂ = Δ, v̂ = Δ², so the first step is η Δ / (|Δ| + τ) ≈ η sign(Δ)
    state, _ = run(ServerOptimizer("fedadam", lr=0.01, tau=1e-9), {A: torch.tensor([0.1, -3.0, 0.0])})
    close(state[A] - X0[A], [0.01, -0.01, 0.0])


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "sgd"}, "server-opt"), ({"lr": 0.0}, "server-lr"), ({"lr": float("nan")}, "server-lr"),
    ({"momentum": 1.0}, "server-momentum"), ({"beta1": -0.1}, "server-beta1"), ({"beta2": 1.0}, "server-beta2"),
    ({"tau": 0.0}, "server-tau"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs: dict, field: str) -> None:
    with pytest.raises(ServerOptError, match=field):
        ServerOptimizer(**kwargs)


def test_updates_that_do_not_fit_the_state_are_refused() -> None:
    opt = ServerOptimizer("fedadam")
    with pytest.raises(ServerOptError, match="unknown tensor 'b'"):
        opt.step(X0, {"b": torch.zeros(3)}, {})
    with pytest.raises(ServerOptError, match=r"shape \(2,\), expected \(3,\)"):
        opt.step(X0, {A: torch.zeros(2)}, {})


def test_committed_state_is_checked_against_the_trainable_state() -> None:
    shapes = {A: (3,), E0: (2,)}
    _, good = run(ServerOptimizer("fedyogi"), D1, D2)
    check_state(good, shapes, "round-0002")
    bad_cases = [
        ({**good, "m/gone": torch.zeros(3)}, "names no tensor"),
        ({**good, "q/a": torch.zeros(3)}, "names no tensor"),
        ({**good, f"v/{A}": torch.zeros(4)}, r"shape \(4,\), expected \(3,\)"),
        ({**good, f"t/{A}": torch.tensor([2])}, r"shape \(1,\), expected \(\)"),
        ({**good, f"m/{A}": torch.tensor([0.0, float("inf"), 0.0])}, "not finite"),
    ]
    for state, message in bad_cases:
        with pytest.raises(ServerOptError, match=message):
            check_state(state, shapes, "round-0002")


def test_warmup_ramps_the_server_lr_per_tensor_over_its_own_steps() -> None:
    """server-warmup W: step t of a tensor moves by eta * min(1, t / W) times the optimizer's move;
    an expert trained in round 1 only has taken one step, whatever the round."""
    eta, b1, b2, tau, w = 0.01, 0.9, 0.99, 1e-3, 4
    state, opt_state = run(ServerOptimizer("fedyogi", lr=eta, beta1=b1, beta2=b2, tau=tau, warmup=w), D1, D2)
    for i in range(3):
        x, m, v = X0[A][i].item(), 0.0, 0.0
        for t, d in ((1, D1[A][i].item()), (2, D2[A][i].item())):
            m = b1 * m + (1 - b1) * d
            v = v - (1 - b2) * d * d * (1.0 if v > d * d else -1.0 if v < d * d else 0.0)
            x += eta * (t / w) * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + tau)
        close(state[A][i : i + 1], [x])
    # fedavg keeps only the step count it needs for the ramp: 1/2 of the mean, then all of it
    state, opt_state = run(ServerOptimizer("fedavg", lr=1.0, warmup=2), D1, D2, D2)
    close(state[A], (X0[A] + 0.5 * D1[A] + D2[A] + D2[A]).tolist())
    close(state[E0], (X0[E0] + 0.5 * D1[E0]).tolist())
    assert int(opt_state[f"t/{A}"]) == 3 and int(opt_state[f"t/{E0}"]) == 1
    with pytest.raises(ServerOptError, match="server-warmup must be >= 0"):
        ServerOptimizer(warmup=-1)


def test_optimizer_state_of_the_wrong_dtype_is_refused() -> None:
    shapes = {"w": (3,)}
    check_state({"m/w": torch.zeros(3), "t/w": torch.tensor(1)}, shapes, "view")
    with pytest.raises(ServerOptError, match="float64, expected torch.float32"):
        check_state({"m/w": torch.zeros(3, dtype=torch.float64)}, shapes, "view")
    with pytest.raises(ServerOptError, match="expected torch.int64"):
        check_state({"t/w": torch.tensor(1.0)}, shapes, "view")


KINDED = {
    "model.layers.0.self_attn.q_proj.lora_B": torch.tensor([1.0, -1.0]),
    "model.layers.0.mlp.experts.down_proj.lora_B.e3": torch.tensor([2.0, 0.5]),
    "model.layers.0.mlp.gate.weight": torch.tensor([0.25, -4.0]),
    "lm_head.lora_B": torch.tensor([-2.0, 8.0]),
}


def test_the_server_lr_is_scaled_per_parameter_kind() -> None:
    """server-lr-{attention,experts,router,head} multiply η for their kind of tensor only; the
    optimizer's moments are the same whatever the scale (only the move is scaled)."""
    from model.lora import kind_of

    assert [kind_of(n) for n in KINDED] == ["attention", "experts", "router", "head"]
    zeros = {k: torch.zeros_like(v) for k, v in KINDED.items()}
    scaled = ServerOptimizer(lr=1.0, lr_attention=0.5, lr_experts=0.25, lr_router=0.0, lr_head=2.0)
    state, _ = scaled.step(zeros, KINDED, {})
    assert [state[n].tolist() for n in KINDED] == [[0.5, -0.5], [0.5, 0.125], [0.0, -0.0], [-4.0, 16.0]]
    plain = ServerOptimizer("fedyogi", lr=0.03, warmup=2)
    kinded = ServerOptimizer("fedyogi", lr=0.03, warmup=2, lr_attention=0.1, lr_experts=0.2, lr_router=0.05, lr_head=1.0)
    x_plain, opt_plain = plain.step(zeros, KINDED, {})
    x_kinded, opt_kinded = kinded.step(zeros, KINDED, {})
    x_plain, opt_plain = plain.step(x_plain, KINDED, opt_plain)
    for name, scale in zip(KINDED, (0.1, 0.2, 0.05, 1.0)):
        x_kinded_2, opt_kinded_2 = kinded.step(x_kinded, KINDED, opt_kinded)
        assert torch.allclose(x_kinded_2[name], scale * x_plain[name], rtol=1e-6)  # both steps scaled alike
    assert all(torch.equal(opt_plain[k], opt_kinded_2[k]) for k in opt_plain)
    with pytest.raises(ServerOptError, match="server-lr-router must be a finite number >= 0"):
        ServerOptimizer(lr_router=-1.0)
    with pytest.raises(ServerOptError, match="server-lr-head must be a finite number >= 0"):
        ServerOptimizer(lr_head=math.inf)
