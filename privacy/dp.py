"""Record-level differential privacy on the member: DP-SGD steps and the (ε, δ) they spend.

A member with DP on trains every local step as DP-SGD (Abadi et al. 2016): a Poisson sample of
its records, each record's gradient clipped to L2 norm `clip_norm` (jointly over all trainable
tensors), the clipped gradients summed, Gaussian noise N(0, σ² clip_norm²) added to every
coordinate, the sum divided by the expected batch size. A *record* is one `seq-len` token block
of the member's packed data (model/tokenizer.py): a document longer than a block spans several
blocks and is protected as a group of that many records.

Hand-written here, and why:
- Per-sample gradients come from `torch.func` (`functional_call` + `vmap` + `grad`) over the
  trainable tensors of the whole peft model. opacus 1.6 computes per-sample gradients from
  hooks on the modules it knows (Linear, Embedding, ...) and their activations; peft's
  per-expert LoRA over the fused expert tensors (`target_parameters`, `ParamWrapper`) never
  calls `lora_B` as a module on activations (it folds `W + s·A·B` into a parametrization of the
  expert stack on every forward), so opacus's hooks never fill its `grad_sample` and
  `make_private` fails with "Per sample gradient is not initialized". `torch.func`
  differentiates the whole forward per sample, whatever way a tensor enters it.
- peft's `ParamWrapper.forward` registers that parametrization per call, which runs
  `original.set_(...)` on the frozen expert tensor: an in-place mutation `grad` refuses inside a
  transform. `functional_experts` swaps in a forward that computes the same `W + s·A·B` (peft's
  own `get_delta_factors`, the same `baddbmm`) and hands it to the expert module with
  `functional_call` instead; a test holds it to peft's own forward, micro-batch by micro-batch.
- transformers' "eager" experts loop over `nonzero()` experts (data-dependent control flow, which
  `vmap` cannot batch); the per-sample pass runs "grouped_mm" instead (the transformers 5 default;
  under `vmap` its `_grouped_mm` and `histc` fall back to a per-sample loop inside torch).
  Measured on the demo base (8 blocks of 128 tokens, 2 shared CPU cores, float32): a plain batch
  step 1.7 s; per-sample gradients by a loop of micro-batches of one 6.8 s; `vmap` over
  "grouped_mm" 5.9-12.8 s (chunks of 2 / whole batch), over "batched_mm" 34-57 s (it gathers a
  full expert matrix per routed token). So `vmap` goes through the routing but is not faster than
  the loop on CPU, where sdpa, `_grouped_mm` and `histc` have no batching rule; it is kept because
  it is one transform of the same loss, with no per-layer bookkeeping to keep right. Whole local
  steps in client/trainer.py on the same base and machine (3 steps, 4 repeats each, other work
  running): fp32 plain 0.55-3.5 s, DP 3.4-8.1 s; bf16 autocast plain 1.5-4.3 s, DP 2.7-4.9 s.
- Clipping and noise are a few lines over the per-sample gradients (below), since the optimizer
  is the trainer's own (AdamW or SGD on the noisy mean gradient: post-processing, free).

Not hand-written: accounting. ε comes from opacus's accountant (`opacus.accountants`, RDP by
default, PRV on request) over the history of (σ, sample rate, steps) this node has spent,
persisted as JSON in the node's state dir (`Budget`), so it survives rounds and restarts.

The sampling is Poisson (each record independently with rate q = batch_size / records), the
sampling opacus's analysis assumes; the noise and the sample come from a generator seeded with
`secrets` (never the round's seed, which the operator knows and could use to subtract the noise).
Like opacus without its secure mode, the Gaussian is torch's floating-point sampler.
What the guarantee covers: the trainable-state update. Not covered: the reply's metadata (which
experts are sent, per-expert token counts, the train loss), which the round uses as before.
"""

from __future__ import annotations

import json
import math
import secrets
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, grad, vmap

from model.io import atomic_write_json

if TYPE_CHECKING:
    from peft.tuners.lora.layer import ParamWrapper

ACCOUNTANTS = ("rdp", "prv")
BUDGET_FILE = "dp-budget.json"  # in the node's state dir
_BUDGET_VERSION = 1


class DPConfigError(ValueError):
    """A DP setting in the node config is missing, malformed or out of range."""


class BudgetSpent(RuntimeError):
    """Another round would take the member past its privacy budget: it declines to train."""


class BudgetFileError(ValueError):
    """The node's DP budget file is unreadable or not one this module wrote."""


@dataclass(frozen=True)
class DPConfig:
    """A member's record-level DP settings (node config keys `dp-*`, README "Node config")."""

    target_epsilon: float  # the budget: the member never trains a round that would pass it
    delta: float
    clip_norm: float  # per-record L2 bound of the gradient, over all trainable tensors together
    noise_multiplier: float | None = None  # σ; None: calibrated from the budget over `rounds`
    rounds: int = 10  # σ calibration: the budget is spent after this many rounds (at round 1's q and steps)
    accountant: str = "rdp"
    large_batch: bool = True  # one step per round over the round's records (round_shape)

    KEYS = ("dp", "dp-target-epsilon", "dp-delta", "dp-clip-norm", "dp-noise-multiplier", "dp-rounds", "dp-accountant",
            "dp-large-batch")

    def round_shape(self, local_steps: int, batch_size: int, lr: float, optimizer: str) -> tuple[int, int, float]:
        """(steps, expected batch, lr) of a round's DP-SGD. With `large_batch` (node config
        `dp-large-batch`, on by default): one step over the records the operator's `local_steps`
        batches would draw, and with local SGD the lr times `local_steps`, so that the update moves
        as far as those steps would. Same records and compute per round; the noise is added once
        instead of `local_steps` times to a batch `local_steps` times larger, which is worth
        sqrt(local_steps) in signal to noise at nearly the same σ (measured on the demo
        consortium, clip 0.5: perplexity ratio to ε = ∞ at ε = 8 went from 1.16 to 1.07, bench/privacy.py)."""
        if not self.large_batch or local_steps == 1:
            return local_steps, batch_size, lr
        return 1, local_steps * batch_size, lr * local_steps if optimizer == "sgd" else lr

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> DPConfig | None:
        """None when `dp` is absent or "off"; else the checked settings, or DPConfigError in one line."""
        unknown = sorted(k for k in node_config if k.startswith("dp-") and k not in cls.KEYS)
        if unknown:
            raise DPConfigError(f"node config {unknown[0]}: unknown DP key (known: {', '.join(cls.KEYS[1:])})")
        switch = str(node_config.get("dp", "off"))
        if switch not in ("on", "off"):
            raise DPConfigError(f"node config dp {switch!r}: expected on or off")
        if switch == "off":
            return None
        epsilon = _number(node_config, "dp-target-epsilon", None, lambda v: v > 0, "a number > 0")
        delta = _number(node_config, "dp-delta", 1e-5, lambda v: 0 < v < 1, "a number in (0, 1)")
        clip = _number(node_config, "dp-clip-norm", 1.0, lambda v: v > 0, "a number > 0")
        sigma = _number(node_config, "dp-noise-multiplier", 0.0, lambda v: v >= 0, "a number > 0 (or absent)")
        raw_rounds = str(node_config.get("dp-rounds", "10"))
        if not raw_rounds.isdigit() or not 1 <= int(raw_rounds) <= 100_000:
            raise DPConfigError(f"node config dp-rounds {raw_rounds!r}: expected an integer 1-100000")
        accountant = str(node_config.get("dp-accountant", "rdp"))
        if accountant not in ACCOUNTANTS:
            raise DPConfigError(f"node config dp-accountant {accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")
        if "dp-noise-multiplier" in node_config and sigma == 0:
            raise DPConfigError("node config dp-noise-multiplier 0: expected a number > 0 (or absent)")
        large = str(node_config.get("dp-large-batch", "on"))
        if large not in ("on", "off"):
            raise DPConfigError(f"node config dp-large-batch {large!r}: expected on or off")
        return cls(epsilon, delta, clip, sigma or None, int(raw_rounds), accountant, large == "on")


def _number(config: Mapping[str, object], key: str, default: float | None, ok: Callable[[float], bool], want: str) -> float:
    raw = config.get(key, default)
    if raw is None:
        raise DPConfigError(f"node config {key} is missing: dp = on needs it ({want})")
    try:
        value = float(str(raw)) if not isinstance(raw, bool) else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise DPConfigError(f"node config {key} {raw!r}: expected {want}")
    return value


@dataclass(frozen=True)
class DPStep:
    """What one DP-SGD step needs: the noise, the per-record bound and the Poisson rate."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    generator: torch.Generator  # seeded from `secrets`: the operator must not know it

    @classmethod
    def secret(cls, noise_multiplier: float, clip_norm: float, sample_rate: float) -> DPStep:
        return cls(noise_multiplier, clip_norm, sample_rate, torch.Generator().manual_seed(secrets.randbits(63)))


def sample_rate(batch_size: int, num_records: int) -> float:
    """Poisson rate that gives `batch_size` records per step on average (capped at 1)."""
    if num_records <= 0:
        raise ValueError("DP-SGD needs at least one record")
    return min(1.0, batch_size / num_records)


def poisson_sample(num_records: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the records in this step's Poisson sample (each in independently with `rate`)."""
    return (torch.rand(num_records, generator=generator) < rate).nonzero().flatten()  # (n,) n ~ Binomial


# ---------------------------------------------------------------- per-sample gradients


def _functional_forward(self: ParamWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """peft's ParamWrapper forward without the in-place parametrization: the same W + s·A·B."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or not adapters:
        return self.base_layer(x, *args, **kwargs)
    weight = self.get_param()
    if len(adapters) == 1 and self.num_experts > 1:  # peft's _LoraFactorsProxy
        lhs, rhs, scaling = self.get_delta_factors(adapters[0])
        with torch.autocast(weight.device.type, enabled=False):
            adapted = torch.baddbmm(weight, lhs, rhs, alpha=scaling)
    else:  # peft's _LoraParameterProxy
        adapted = weight + sum(self.get_delta_weight(a) for a in adapters)
    path, inner = [], self.base_layer
    while hasattr(inner, "base_layer"):  # a wrapper of a wrapper: the tensor lives on the innermost module
        path.append("base_layer")
        inner = inner.base_layer
    return functional_call(self.base_layer, {".".join([*path, self.parameter_name]): adapted}, (x, *args), kwargs)


@contextmanager
def functional_experts(model: torch.nn.Module) -> Iterator[None]:
    """Inside: the model's per-expert LoRA and its experts can run under `torch.func` transforms."""
    from peft.tuners.lora.layer import ParamWrapper  # peft on use: a node's DP settings are read without it

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_experts_implementation", None) == "eager"}
    for wrapper in wrappers:
        wrapper.forward = types.MethodType(_functional_forward, wrapper)  # type: ignore[method-assign]
    for config in configs.values():
        config._experts_implementation = "grouped_mm"
    try:
        yield
    finally:
        for wrapper in wrappers:
            del wrapper.forward
        for config in configs.values():
            config._experts_implementation = "eager"


SampleLoss = Callable[[Any], torch.Tensor]  # the model's output for one sample -> the loss to differentiate


def per_sample_gradients(
    model: torch.nn.Module,
    inputs: torch.Tensor,  # (B, T) token ids
    labels: torch.Tensor,  # (B, T)
    loss_of: SampleLoss,
    *,
    chunk_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(gradient of each sample's `loss_of` by trainable parameter name, each (B, *shape); each
    sample's model loss (B,) and router aux loss (B,), zero without one; the router logits per
    MoE layer, each (B, T, E)), all detached."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(values: dict[str, torch.Tensor], ids: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = functional_call(model, values, (), {"input_ids": ids.unsqueeze(0), "labels": target.unsqueeze(0),
                                                  "output_router_logits": True})
        logits = tuple(r.detach() for r in out.router_logits) if out.router_logits is not None else ()
        aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros((), device=ids.device)
        return loss_of(out), (out.loss.detach(), aux, logits)

    with functional_experts(model), warnings.catch_warnings():
        # sdpa, _grouped_mm, histc, bincount: torch loops per sample where no batching rule exists (module docstring)
        warnings.filterwarnings("ignore", message=".*have not yet implemented the batching rule.*", category=UserWarning)
        grads, (losses, aux, logits) = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size)(
            params, inputs, labels
        )
    return grads, losses, aux, logits


def privatize(
    per_sample: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float, expected_batch: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The DP-SGD gradient: each sample's gradient clipped to `clip_norm` (jointly over all
    tensors), summed, N(0, (σ·clip_norm)²) added per coordinate, divided by the expected batch
    size (not the drawn one: under Poisson sampling the drawn size is itself private). A record
    whose gradient is not finite (e.g. a block with no trained token) counts as zero."""
    return add_noise(clipped_sum(per_sample, clip_norm), clip_norm, noise_multiplier, expected_batch, generator)


def clipped_sum(per_sample: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """The sum over the samples of their gradients, each clipped to `clip_norm` jointly over all
    tensors (a non-finite one counts as zero). Sums of disjoint chunks of a sample add up to the
    whole sample's: a large batch is clipped chunk by chunk in bounded memory."""
    first = next(iter(per_sample.values()))
    squares = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)  # (B,)
    for g in per_sample.values():
        squares += g.float().pow(2).flatten(1).sum(dim=1)
    finite = torch.isfinite(squares)
    factor = torch.where(finite, (clip_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0), 0.0)  # (B,)
    return {name: torch.einsum("b,b...->...", factor, torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0))
            for name, g in per_sample.items()}


def add_noise(total: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float, expected_batch: float,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`total` (a clipped sum) with N(0, (σ·clip_norm)²) per coordinate, over the expected batch."""
    noisy: dict[str, torch.Tensor] = {}
    for name, clipped in total.items():
        noise = torch.normal(0.0, noise_multiplier * clip_norm, size=clipped.shape, generator=generator)
        noisy[name] = (clipped + noise.to(clipped.device)) / expected_batch
    return noisy


def noise_only(shapes: Mapping[str, torch.Size], clip_norm: float, noise_multiplier: float, expected_batch: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The DP-SGD gradient of a step whose Poisson sample came out empty: the noise alone."""
    return add_noise({n: torch.zeros(tuple(s)) for n, s in shapes.items()}, clip_norm, noise_multiplier, expected_batch,
                     generator)


# ---------------------------------------------------------------- the budget, on the node


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε after `history` ((σ, sample rate, steps), ...) at δ, by opacus's accountant."""
    from opacus.accountants import create_accountant  # opacus pulls in its training stack: import on use

    if not history:
        return 0.0
    book = create_accountant(mechanism=accountant)
    book.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(book.get_epsilon(delta=delta))


def calibrate(config: DPConfig, rate: float, steps_per_round: int) -> float:
    """σ that spends the budget in `config.rounds` rounds of `steps_per_round` steps at `rate`."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=config.delta,
                                      sample_rate=rate, steps=config.rounds * steps_per_round,
                                      accountant=config.accountant))


@dataclass
class Budget:
    """The node's privacy budget: every DP-SGD step it has taken on its data, whatever the run,
    kept in `<state-dir>/dp-budget.json` (written atomically before the update leaves)."""

    path: Path
    config: DPConfig
    history: list[tuple[float, float, int]]
    noise_multiplier: float | None  # σ fixed at the first DP round (given, or calibrated then)

    @classmethod
    def load(cls, state_dir: Path, config: DPConfig) -> Budget:
        path = state_dir / BUDGET_FILE
        if not path.is_file():
            return cls(path, config, [], config.noise_multiplier)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["version"] != _BUDGET_VERSION:
                raise BudgetFileError(f"{path}: budget file version {data['version']!r}, expected {_BUDGET_VERSION}")
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            sigma = data["noise_multiplier"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, BudgetFileError):
                raise
            raise BudgetFileError(f"{path}: unreadable DP budget ({type(exc).__name__}); "
                                  "it is the record of what this node has spent: restore it, never delete it") from None
        if any(not (s > 0 and 0 < q <= 1 and n > 0) for s, q, n in history):
            raise BudgetFileError(f"{path}: DP budget history holds an entry out of range")
        return cls(path, config, history, config.noise_multiplier or (float(sigma) if sigma is not None else None))

    def spent(self) -> float:
        return epsilon_of(self.history, self.config.delta, self.config.accountant)

    def plan(self, rate: float, steps: int) -> DPStep:
        """This round's DP-SGD step (σ calibrated on the first round), or BudgetSpent if the
        round's `steps` at `rate` would take ε past the budget."""
        sigma = self.noise_multiplier if self.noise_multiplier is not None else calibrate(self.config, rate, steps)
        after = epsilon_of([*self.history, (sigma, rate, steps)], self.config.delta, self.config.accountant)
        if after > self.config.target_epsilon:
            raise BudgetSpent(
                f"DP budget spent: ε {self.spent():.3g} of {self.config.target_epsilon:g} (δ {self.config.delta:g}); "
                f"this round's {steps} steps would bring it to {after:.3g}, so the member no longer trains"
            )
        self.noise_multiplier = sigma
        return DPStep.secret(sigma, self.config.clip_norm, rate)

    def spend(self, step: DPStep, steps: int) -> float:
        """Record `steps` DP-SGD steps (atomically, in the state dir); ε spent after them."""
        self.history.append((step.noise_multiplier, step.sample_rate, steps))
        atomic_write_json(self.path, {"version": _BUDGET_VERSION, "noise_multiplier": self.noise_multiplier,
                                      "accountant": self.config.accountant, "history": [list(h) for h in self.history]})
        return self.spent()
