"""Server optimizers on the round's pseudo-gradient: FedAvg, FedAvgM, FedAdam, FedYogi.

After aggregation the server holds Δ, the token-weighted mean of the members' deltas
(local - global), per tensor of the trainable state; under secure aggregation the same mean
comes from the group sums, so everything here needs only the sum. Δ is a step along the
negative gradient (Reddi et al., "Adaptive Federated Optimization", 2021), and the server
moves the global state x with an optimizer of its own:

    fedavg    x += η Δ                                       (η = 1: plain federated averaging)
    fedavgm   v = β v + Δ;                      x += η v
    fedadam   m = β1 m + (1 - β1) Δ;  v = β2 v + (1 - β2) Δ²;             x += η m̂ / (√v̂ + τ)
    fedyogi   m as fedadam;           v = v - (1 - β2) Δ² sign(v - Δ²);  x += η m̂ / (√v̂ + τ)

with m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t) (Adam's bias correction, as Flower's own FedAdam
does). η is scaled per parameter kind (`lr_scale`: attention adapters, experts, router, output
head; model/lora.py `kind_of`). An adaptive step moves every coordinate by about η whatever the
kind, and the kinds do not tolerate the same move: measured on the demo base, one FedYogi step of
η sign(Δ) on the round's mean update, kind by kind, at η = 0.03: the head's lowered every
domain's perplexity (1-5%), the attention adapters' raised it (1-8%), the router's raised it on
four domains of five at every η tried (0.01-0.1; a full weight, not a LoRA factor starting at zero). With `warmup` = W > 0, η ramps linearly over a tensor's first W steps (η t / W): a
bias-corrected adaptive step starts as η sign(Δ) on every coordinate, noise included, and on the
demo that first full step made every domain worse for three rounds. State is per tensor, so per
expert: each tensor keeps its moments and its own step count t, which advance only in rounds
where the tensor is in Δ. An expert no member trained this
round keeps its value and its state exactly; its moments do not decay while it sits idle.

The state is a flat name -> tensor mapping ("m/<tensor>", "v/<tensor>", "t/<tensor>") that the
round loop commits with each round as safetensors, so a resumed run continues bit-identically.
Pure functions over tensors; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from model.lora import KINDS, kind_of

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
OptState = dict[str, torch.Tensor]


class ServerOptError(ValueError):
    """A server optimizer configured out of range, or state that does not fit the trainable state."""


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "fedavg"
    lr: float = 1.0  # η, the server learning rate
    momentum: float = 0.9  # β of fedavgm
    beta1: float = 0.9  # fedadam / fedyogi first moment
    beta2: float = 0.99  # fedadam / fedyogi second moment
    tau: float = 1e-3  # adaptivity τ: the smallest step denominator (Reddi et al. use 1e-3)
    warmup: int = 0  # η ramps linearly over each tensor's first `warmup` steps; 0: full η from the start
    lr_attention: float = 1.0  # η's multiplier for the attention adapters
    lr_experts: float = 1.0  # ... the experts' adapters
    lr_router: float = 1.0  # ... the router
    lr_head: float = 1.0  # ... the output head's adapter

    def __post_init__(self) -> None:
        checks = [
            (self.name in OPTIMIZERS, f"server-opt must be one of {', '.join(OPTIMIZERS)}, not {self.name!r}"),
            (math.isfinite(self.lr) and self.lr > 0, f"server-lr must be > 0, not {self.lr}"),
            (0 <= self.momentum < 1, f"server-momentum must be in [0, 1), not {self.momentum}"),
            (0 <= self.beta1 < 1, f"server-beta1 must be in [0, 1), not {self.beta1}"),
            (0 <= self.beta2 < 1, f"server-beta2 must be in [0, 1), not {self.beta2}"),
            (math.isfinite(self.tau) and self.tau > 0, f"server-tau must be > 0, not {self.tau}"),
            (self.warmup >= 0, f"server-warmup must be >= 0 rounds, not {self.warmup}"),
            *((math.isfinite(scale) and scale >= 0, f"server-lr-{kind} must be a finite number >= 0, not {scale}")
              for kind, scale in zip(KINDS, self.lr_scale)),
        ]
        for ok, message in checks:
            if not ok:
                raise ServerOptError(message)

    @property
    def lr_scale(self) -> tuple[float, ...]:
        """η's multiplier per parameter kind, in the order of model/lora.py KINDS."""
        return self.lr_attention, self.lr_experts, self.lr_router, self.lr_head

    def step(
        self, state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], opt_state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], OptState]:
        """(new global state, new optimizer state); tensors absent from `delta` are left as they are."""
        unknown = sorted(set(delta) - set(state))
        if unknown:
            raise ServerOptError(f"update for unknown tensor {unknown[0]!r}")
        new_state = dict(state)
        new_opt = dict(opt_state)
        for name in sorted(delta):
            x, d = state[name], delta[name]
            if d.shape != x.shape:
                raise ServerOptError(f"update for {name!r} has shape {tuple(d.shape)}, expected {tuple(x.shape)}")
            new_state[name] = x + self._direction(name, d, new_opt)
        return new_state, new_opt

    def _direction(self, name: str, d: torch.Tensor, opt: OptState) -> torch.Tensor:
        """η_t times this round's move for tensor `name`; updates `opt` in place for that tensor."""
        t = int(opt[f"t/{name}"].item()) + 1 if f"t/{name}" in opt else 1
        lr = self.lr * self.lr_scale[KINDS.index(kind_of(name))]
        lr = lr * min(1.0, t / self.warmup) if self.warmup else lr
        if self.name == "fedavg":
            move = d
        elif self.name == "fedavgm":
            move = opt[f"v/{name}"] = self.momentum * _moment(opt, "v", name, d) + d
        else:
            m = self.beta1 * _moment(opt, "m", name, d) + (1 - self.beta1) * d
            v_old, d2 = _moment(opt, "v", name, d), d * d
            if self.name == "fedadam":
                v = self.beta2 * v_old + (1 - self.beta2) * d2
            else:  # fedyogi: v moves towards Δ² by at most (1 - β2) Δ², so it forgets slowly
                v = v_old - (1 - self.beta2) * d2 * torch.sign(v_old - d2)
            opt[f"m/{name}"], opt[f"v/{name}"] = m, v
            move = (m / (1 - self.beta1**t)) / ((v / (1 - self.beta2**t)).sqrt() + self.tau)
        if self.warmup or self.name in ("fedadam", "fedyogi"):  # the step count: bias correction, warm-up
            opt[f"t/{name}"] = torch.tensor(t, dtype=torch.int64)
        return lr * move


def check_state(opt_state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Committed optimizer state must name tensors of the trainable state, with their shapes."""
    for key, value in opt_state.items():
        kind, _, name = key.partition("/")
        if kind not in ("m", "v", "t") or name not in shapes:
            raise ServerOptError(f"{source}: optimizer state {key!r} names no tensor of the trainable state")
        expected = () if kind == "t" else shapes[name]
        if tuple(value.shape) != expected:
            raise ServerOptError(f"{source}: optimizer state {key!r} has shape {tuple(value.shape)}, expected {expected}")
        dtype = torch.int64 if kind == "t" else torch.float32
        if value.dtype != dtype:
            raise ServerOptError(f"{source}: optimizer state {key!r} is {value.dtype}, expected {dtype}")
        if not torch.isfinite(value.double()).all():
            raise ServerOptError(f"{source}: optimizer state {key!r} is not finite")


def _moment(opt: OptState, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
    return opt.get(f"{kind}/{name}", torch.zeros_like(like))
