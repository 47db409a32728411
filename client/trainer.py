"""The member's local training recipe: a plain loop over private data, under mixed precision.

Reads top to bottom: load the global trainable state, train `local_steps` steps, count the
tokens routed to each expert, return the delta (local - global) of the experts this member
actually used plus the shared adapters and router. With DP on (`TrainConfig.dp`), each step is
DP-SGD instead (privacy/dp.py): a Poisson sample, per-record gradients clipped, noise added.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from model.precision import Precision
from model import families
from model.lora import LoraMoE, expert_of
from model.moe import balance_loss, routed_token_counts
from model.tokenizer import batches
from privacy.dp import DPStep, add_noise, clipped_sum, noise_only, per_sample_gradients, poisson_sample
from protos.messages import LOCAL_OPTIMIZERS

DP_CHUNK = 16  # records whose per-sample gradients are held at once in a DP-SGD step


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    batch_size: int
    lr: float
    seed: int
    min_expert_tokens: int  # experts this member routed fewer tokens to are not sent
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # LOCAL_OPTIMIZERS
    expert_load: torch.Tensor | None = None  # (L, E) consortium load to balance against; None: own batch
    balance_weight: float = 1.0  # this member's part of the consortium's tokens
    # SCAFFOLD: c - c_i, added to every step's (clipped) gradient; None: no drift correction
    correction: Mapping[str, torch.Tensor] | None = None
    track_gradient: bool = False  # return the mean clipped gradient (the member's next c_i)
    dp: DPStep | None = None  # record-level DP-SGD (privacy/dp.py); None: plain steps


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, torch.Tensor]
    expert_tokens: dict[str, int]  # 'l:e' -> tokens routed to that expert, over all steps
    num_tokens: int
    num_examples: int
    train_loss: float  # mean LM loss over the local steps (router aux loss excluded)
    seconds: float
    experts_sent: int
    experts_skipped: int
    mean_gradient: dict[str, torch.Tensor] | None = None  # track_gradient: mean clipped raw gradient
    dp_epsilon: float | None = None  # DP on: ε the node has spent so far, with this round (client/node.py fills it)
    dp_delta: float | None = None


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The member's local optimizer. No weight decay: it would move experts this member never routed to.

    "sgd" (plain, no momentum) is the local half of adaptive federated optimization (Reddi et al.):
    the round's delta is then a sum of the member's gradients, and a server optimizer
    (server-opt = fedadam/fedyogi) does the per-coordinate scaling once, on the consortium's
    pseudo-gradient. Local AdamW scales each member's own domain-specific directions up to a
    full step before they are averaged; on the demo's one-domain-per-member consortium that
    conflict cost most of the gain (the README's demo training recipe).
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"local-opt must be one of {', '.join(LOCAL_OPTIMIZERS)}, not {name!r}")


def train_local(
    lora: LoraMoE,
    global_state: Mapping[str, torch.Tensor],
    blocks: torch.Tensor,  # (N, T) token blocks of the member's private data
    config: TrainConfig,
    precision: Precision,
    labels: torch.Tensor | None = None,  # (N, T) targets, -100 where nothing is trained (default: the blocks)
) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    lora.set_state(global_state)
    start_state = lora.get_state()
    model = lora.model.to(precision.device)
    model.train()
    params = lora.trainable_parameters()
    optimizer = make_optimizer(config.optimizer, params, config.lr)
    scaler = precision.make_scaler()
    top_k = families.top_k(model.config)
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))

    routed = torch.zeros(model.config.num_hidden_layers, families.num_experts(model.config), dtype=torch.int64)
    moe_rows = families.moe_layers(model)  # router_logits has one entry per MoE layer, not per layer
    losses: list[float] = []
    gradient_sum: dict[str, torch.Tensor] | None = None
    targets = blocks if labels is None else labels
    if targets.shape != blocks.shape:
        raise ValueError(f"labels {tuple(targets.shape)} do not match the blocks {tuple(blocks.shape)}")
    stream = batches(torch.arange(blocks.shape[0]).unsqueeze(1), config.batch_size, seed=config.seed)

    def loss_of(out: object) -> torch.Tensor:
        """The step's loss on a model output: LM loss, with the consortium's balance term if asked."""
        if config.expert_load is not None and out.aux_loss is not None:  # type: ignore[attr-defined]
            # the model's own term balances this member's batch; swap it for the consortium's
            consortium = balance_loss(out.router_logits, top_k, config.expert_load[moe_rows], config.balance_weight)  # type: ignore[attr-defined]
            return out.loss - aux_coef * out.aux_loss + aux_coef * consortium  # type: ignore[attr-defined]
        return out.loss  # type: ignore[attr-defined]

    for _ in range(config.local_steps):
        if config.dp is not None:
            routed[moe_rows] += dp_step(model, blocks, targets, config, config.dp, loss_of, precision, top_k, losses)
        else:
            rows = next(stream).squeeze(1)
            batch, batch_labels = blocks[rows].to(precision.device), targets[rows].to(precision.device)  # (B, T)
            with torch.autocast(
                precision.device.type,
                dtype=precision.autocast_dtype,
                enabled=precision.autocast_dtype is not None,
            ):
                out = model(input_ids=batch, labels=batch_labels, output_router_logits=True)
            scaler.scale(loss_of(out)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            routed[moe_rows] += routed_token_counts(out.router_logits, top_k)
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            losses.append(float(out.loss.detach()) - aux_coef * aux)
        if config.track_gradient:  # the member's own gradient, before any correction
            raw = lora.get_grad()
            gradient_sum = raw if gradient_sum is None else {k: v + raw[k] for k, v in gradient_sum.items()}
        if config.correction is not None:  # SCAFFOLD: step along g - c_i + c
            lora.add_to_grad(config.correction)
        if config.dp is not None:  # no loss scaling in a DP step: its gradient is set, not backpropagated
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    model.to("cpu")
    end_state = lora.get_state()
    expert_tokens = {
        f"{layer}:{e}": int(routed[layer, e])
        for layer in range(routed.shape[0])
        for e in range(routed.shape[1])
    }
    delta: dict[str, torch.Tensor] = {}
    sent, skipped = set(), set()
    for name, value in end_state.items():
        group = expert_of(name)
        if group is not None and expert_tokens[group] < config.min_expert_tokens:
            skipped.add(group)
            continue
        if group is not None:
            sent.add(group)
        delta[name] = value - start_state[name]
    num_examples = config.local_steps * config.batch_size  # under DP: the expected count the gradients are divided by
    if config.dp is not None:  # a Poisson sample may draw more than its expected count
        expert_tokens = {g: min(n, num_examples * blocks.shape[1]) for g, n in expert_tokens.items()}
    return TrainResult(
        delta=delta,
        expert_tokens={g: n for g, n in expert_tokens.items() if g in sent},
        num_tokens=num_examples * blocks.shape[1],
        num_examples=num_examples,
        train_loss=sum(losses) / max(len(losses), 1),
        seconds=time.perf_counter() - started,
        experts_sent=len(sent),
        experts_skipped=len(skipped),
        mean_gradient={k: v / config.local_steps for k, v in gradient_sum.items()} if gradient_sum is not None else None,
    )


def dp_step(
    model: torch.nn.Module,
    blocks: torch.Tensor,  # (N, T)
    targets: torch.Tensor,  # (N, T)
    config: TrainConfig,
    dp: DPStep,
    loss_of: Callable[[object], torch.Tensor],
    precision: Precision,
    top_k: int,
    losses: list[float],
) -> torch.Tensor:
    """One DP-SGD step's gradient, set on the trainable parameters; returns the tokens routed to
    each expert (moe layers, E) by the step's sample and appends its mean LM loss to `losses`."""
    rows = poisson_sample(blocks.shape[0], dp.sample_rate, dp.generator)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if rows.numel() == 0:  # an empty sample still takes a (noise-only) step: skipping would tell
        noisy = noise_only({n: p.shape for n, p in trainable.items()}, dp.clip_norm, dp.noise_multiplier,
                           config.batch_size, dp.generator)
        counts = torch.zeros(len(families.moe_layers(model)), families.num_experts(model.config), dtype=torch.int64)
    else:
        total: dict[str, torch.Tensor] = {}
        counts, lm_losses = None, []
        aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
        for chunk in rows.split(DP_CHUNK):  # per-sample gradients of DP_CHUNK records at a time: bounded memory
            batch, batch_labels = blocks[chunk].to(precision.device), targets[chunk].to(precision.device)  # (n, T)
            with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                                enabled=precision.autocast_dtype is not None):
                grads, model_losses, aux_losses, router_logits = per_sample_gradients(model, batch, batch_labels, loss_of)
            for name, value in clipped_sum(grads, dp.clip_norm).items():
                total[name] = total[name] + value if name in total else value
            del grads
            routed = routed_token_counts(tuple(r.flatten(0, 1) for r in router_logits), top_k)
            counts = routed if counts is None else counts + routed
            lm_losses.append(model_losses.float() - aux_coef * aux_losses.float())
        noisy = add_noise(total, dp.clip_norm, dp.noise_multiplier, config.batch_size, dp.generator)
        losses.append(float(torch.cat(lm_losses).mean()))
    for name, param in trainable.items():
        param.grad = noisy[name].to(param.device, param.dtype)
    return counts
