"""Run config: the `[tool.flwr.app.config]` keys as one validated, typed object.

Defaults live in pyproject.toml (Flower's place for them) and are mirrored here so that code
that runs rounds in-process (tests, benchmarks) needs no pyproject; a test keeps the two equal.
Every key is documented in README.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from aggregation.codec_config import CodecConfig
from aggregation.robust import AGGREGATORS
from aggregation.schedule import Schedule
from aggregation.server_opt import ServerOptError, ServerOptimizer
from model.precision import CHOICES as PRECISIONS
from protos.messages import LOCAL_OPTIMIZERS, RUN_NAME


class ConfigError(ValueError):
    """A run-config key is unknown or has a bad value."""


@dataclass(frozen=True)
class RunConfig:
    workspace: str = ".fedmoe/demo"
    run_name: str = "default"  # runs/<run-name>/ in the workspace: the committed rounds and ledger
    free_rider: bool = False  # simulation only: the last simulated node plays the demo's free rider
    num_rounds: int = 4
    members_per_round: int = 0  # 0: every connected member
    min_members: int = 2
    local_steps: int = 12
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 0.003
    min_expert_tokens: int = 64
    broadcast: str = "delta"  # "delta": int8 patches of the view; "step": the mean update, replayed; "full"
    codec: str = "fp16"  # update encoding, aggregation/codec.py: e.g. "int8", "randk0.05+int8", "topk0.01+int8"
    codec_clip: float = 0.0  # > 0: shared range [-clip, clip] for int8/int4 (secure-aggregation summable)
    update_clip: float = 0.0  # > 0: each member scales its update down to this L2 norm before encoding it
    max_update_bytes: int = 64 * 1024 * 1024  # a larger update is refused before it is parsed
    precision: str = "auto"
    eval_batches: int = 8
    seed: int = 0
    round_timeout: float = 600.0
    round_retries: int = 3  # a round aborted for too few members runs again this many times before the run stops
    round_retry_backoff: float = 10.0  # seconds before the first retry, doubling with each
    contribution: str = "auto"  # "open": GTG-Shapley on updates; "secure": group sums; "off"; "auto": by secagg
    contribution_min_group: int = 3  # secure contribution: smallest group whose sum is revealed
    contribution_batches: int = 2  # validation batches per domain for each coalition evaluation
    contribution_permutations: int = 40  # most GTG-Shapley permutations per round
    replay_window: int = 8  # open contribution: past rounds' changes a replayed update is checked against
    secagg: str = "off"  # "on": the operator sees only sums of updates (privacy/secagg.py)
    secagg_threshold: int = 0  # shares needed to unmask; 0: two thirds of each member's share holders
    secagg_neighbours: int = 0  # neighbours per member (SecAgg+); 0: about 2*log2(members)
    secagg_ring_bits: int = 0  # ring width; 0: what the sum of the group needs (12 bits for 10 int8 members)
    secagg_timeout: float = 120.0  # seconds per secure-aggregation stage
    dp_member_epsilon: float = 0.0  # > 0: member-level DP over the run, Skellam noise in the masked sums (secagg on)
    dp_member_delta: float = 1e-5  # ... its delta
    local_opt: str = "adamw"  # the members' local optimizer: "adamw" or "sgd" (client/trainer.py)
    expert_balance: str = "consortium"  # members balance expert load against the consortium's, or their own
    update_norm_bound: float = 3.0  # open mode: an update's L2 norm is scaled down to this x the round's median (0: off)
    aggregator: str = "mean"  # open mode: "mean" (token-weighted), "median" or "trimmed-mean" per coordinate
    aggregator_trim: float = 0.2  # trimmed-mean: the fraction dropped at each end of every coordinate
    schedule: str = "fixed"  # "adaptive": local steps and members per round from the loss slope (aggregation/schedule.py)
    schedule_min_steps: int = 2
    schedule_max_steps: int = 64
    round_seconds_budget: float = 0.0  # adaptive: a member's training seconds per round at most; 0: none
    round_bytes_budget: int = 0  # adaptive: a round's bytes up and down, all members, at most; 0: none
    server_opt: str = "fedavg"  # the server's step on the aggregated update (aggregation/server_opt.py)
    server_lr: float = 1.0  # server learning rate
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam, fedyogi
    server_beta2: float = 0.99  # fedadam, fedyogi
    server_tau: float = 1e-3  # fedadam, fedyogi: adaptivity
    server_warmup: int = 0  # the server lr ramps linearly over each tensor's first N steps
    server_lr_attention: float = 1.0  # server-lr's multiplier for the attention adapters
    server_lr_experts: float = 1.0  # ... the experts' adapters
    server_lr_router: float = 1.0  # ... the router
    server_lr_head: float = 1.0  # ... the output head's adapter

    @classmethod
    def from_user_config(cls, user: Mapping[str, Any]) -> RunConfig:
        """From Flower's run config (kebab-case keys); unknown keys and bad values are refused."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in user.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"run config: unknown key {key!r}")
            kind = type(getattr(cls(), name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"run config: {key} = {value!r} must be {kind.__name__}")
            values[name] = value
        return cls(**values).validated()

    def validated(self) -> RunConfig:
        checks = [
            (RUN_NAME.fullmatch(self.run_name) is not None,
             "run-name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
            (self.num_rounds >= 1, "num-rounds must be >= 1"),
            (self.members_per_round >= 0, "members-per-round must be >= 0"),
            (self.min_members >= 1, "min-members must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.seq_len >= 8, "seq-len must be >= 8"),
            (self.lr > 0, "lr must be > 0"),
            (self.local_opt in LOCAL_OPTIMIZERS, f"local-opt must be one of {', '.join(LOCAL_OPTIMIZERS)}"),
            (self.min_expert_tokens >= 0, "min-expert-tokens must be >= 0"),
            (self.broadcast in ("delta", "step", "full"), "broadcast must be 'delta', 'step' or 'full'"),
            (self.codec_clip >= 0, "codec-clip must be >= 0"),
            (math.isfinite(self.update_clip) and self.update_clip >= 0, "update-clip must be a finite number >= 0 (0: off)"),
            (self.max_update_bytes > 0, "max-update-bytes must be > 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.eval_batches >= 1, "eval-batches must be >= 1"),
            (self.round_timeout > 0, "round-timeout must be > 0"),
            (self.contribution in ("auto", "open", "secure", "off"),
             "contribution must be 'auto', 'open', 'secure' or 'off'"),
            (self.contribution_min_group >= 2, "contribution-min-group must be >= 2"),
            (0 <= self.replay_window <= 1000, "replay-window must be between 0 and 1000 rounds"),
            (self.secagg in ("on", "off"), "secagg must be 'on' or 'off'"),
            (self.secagg_threshold >= 0, "secagg-threshold must be >= 0 (0: automatic)"),
            (self.secagg_neighbours >= 0, "secagg-neighbours must be >= 0 (0: automatic)"),
            (self.secagg_timeout > 0, "secagg-timeout must be > 0"),
            (self.secagg_ring_bits == 0 or 8 <= self.secagg_ring_bits <= 62,
             "secagg-ring-bits must be 0 (automatic) or in 8..62"),
            (self.secagg == "on" or self.contribution != "secure",
             "contribution 'secure' values group sums from secure aggregation: set secagg = 'on'"),
            (self.secagg == "off" or self.contribution != "open",
             "contribution 'open' needs individual updates, which secagg = 'on' hides: use 'secure' or 'auto'"),
            (self.contribution_batches >= 1, "contribution-batches must be >= 1"),
            (self.contribution_permutations >= 1, "contribution-permutations must be >= 1"),
            (self.expert_balance in ("consortium", "member"), "expert-balance must be 'consortium' or 'member'"),
            (self.update_norm_bound == 0 or self.update_norm_bound >= 1,
             "update-norm-bound must be 0 (off) or >= 1 (a multiple of the round's median update norm)"),
            (self.aggregator in AGGREGATORS, f"aggregator must be one of {', '.join(AGGREGATORS)}"),
            (0 <= self.aggregator_trim < 0.5, "aggregator-trim must be in [0, 0.5)"),
            (self.secagg == "off" or self.aggregator == "mean",
             "secagg = 'on' shows the operator only sums, which a robust aggregator cannot use: set aggregator = 'mean'"),
            (math.isfinite(self.dp_member_epsilon) and self.dp_member_epsilon >= 0,
             "dp-member-epsilon must be a finite number >= 0 (0: off)"),
            (0 < self.dp_member_delta < 1, "dp-member-delta must be in (0, 1)"),
            (self.round_retries >= 0, "round-retries must be >= 0"),
            (math.isfinite(self.round_retry_backoff) and self.round_retry_backoff >= 0,
             "round-retry-backoff must be a finite number of seconds >= 0"),
            (self.dp_member_epsilon == 0 or (self.secagg == "on" and self.update_clip > 0),
             "dp-member-epsilon adds noise inside secure aggregation and needs the members' clip: set secagg = 'on' "
             "and update-clip > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"run config: {message}")
        self.server_optimizer()
        self.schedule_config()
        codec = self.codec_config()
        if self.secagg == "on" and not codec.secure_compatible:
            raise ConfigError(
                f"run config: secagg = 'on' sums members' integers blind, so codec must be int8/int4 "
                f"with a shared codec-clip > 0 and no topk (got codec {self.codec!r}, codec-clip "
                f"{self.codec_clip}); e.g. codec = 'randk0.1+int8', codec-clip = 0.05"
            )
        return self

    @property
    def contribution_mode(self) -> str:
        """'open', 'secure' or 'off' ('auto' follows secagg)."""
        if self.contribution == "auto":
            return "secure" if self.secagg == "on" else "open"
        return self.contribution

    @property
    def token_budget(self) -> int:
        """Tokens a member trains on in a round: self-reported counts are bounded by it."""
        return self.local_steps * self.batch_size * self.seq_len

    def with_overrides(self, **changes: Any) -> RunConfig:
        return replace(self, **changes).validated()

    def codec_config(self) -> CodecConfig:
        try:
            return CodecConfig.parse(self.codec, clip=self.codec_clip or None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"run config: {exc}") from None

    def schedule_config(self) -> Schedule:
        try:
            return Schedule(
                mode=self.schedule, min_steps=self.schedule_min_steps, max_steps=self.schedule_max_steps,
                round_seconds=self.round_seconds_budget, round_bytes=self.round_bytes_budget,
            )
        except ValueError as exc:
            raise ConfigError(f"run config: {exc}") from None

    def server_optimizer(self) -> ServerOptimizer:
        try:
            return ServerOptimizer(
                name=self.server_opt, lr=self.server_lr, momentum=self.server_momentum,
                beta1=self.server_beta1, beta2=self.server_beta2, tau=self.server_tau,
                warmup=self.server_warmup, lr_attention=self.server_lr_attention, lr_experts=self.server_lr_experts,
                lr_router=self.server_lr_router, lr_head=self.server_lr_head,
            )
        except ServerOptError as exc:
            raise ConfigError(f"run config: {exc}") from None

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    def as_user_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def changed_server_settings(was: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, committed value, value now) for each server-optimizer key (`server-*`) that a
    committed run's config `was` gives another value than `now`, sorted by key: a run resumed under
    any of them would continue its optimizer state wrongly. A key `was` lacks was committed before
    the key existed, when the run behaved as its default does."""
    defaults = RunConfig().as_user_config()
    committed = {k: was.get(k, defaults.get(k)) for k in sorted(now) if k.startswith("server-")}
    return [(k, value, now[k]) for k, value in committed.items() if value != now[k]]
