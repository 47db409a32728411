"""The operator's Prometheus metrics: a round-loop `Reporter` that updates gauges and counters
(and passes every event on to the reporter it wraps), and the cost estimate behind them.

The ServerApp runs in a process Flower starts per run, so the endpoint is served from that
process while a run is in progress. `fedmoe serve` (and any embedded run) switches it on with
environment variables the ServerApp process inherits:

    FEDMOE_METRICS_PORT               port of the /metrics endpoint (unset: no endpoint)
    FEDMOE_METRICS_ADDR               address to bind (default 127.0.0.1)
    FEDMOE_PRICE_GPU_HOUR             price of one GPU-hour (any currency; default 0)
    FEDMOE_PRICE_MILLION_TOKENS       price per million training tokens (default 0)
    FEDMOE_MEMBER_GPUS, FEDMOE_SERVER_GPUS   GPUs billed per member / for the server (default 1)

Cost of a round (`estimate_cost`):

    gpu_hours = (member_gpus * sum of members' training seconds + server_gpus * round seconds) / 3600
    cost      = price_gpu_hour * gpu_hours + price_million_tokens * tokens / 1e6

Members' seconds are their self-reported training wall time; tokens are the valid updates' token
counts, which the round loop bounds by the round's token budget. Every metric is documented in
docs/deployment.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.summary import LogReporter, Reporter, RoundSummary

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("fedmoe.server")


@dataclass(frozen=True)
class Prices:
    gpu_hour: float = 0.0
    million_tokens: float = 0.0
    member_gpus: float = 1.0
    server_gpus: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Prices:
        env = os.environ if env is None else env

        def number(key: str, default: float) -> float:
            raw = env.get(key, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{key}={raw!r}: not a number") from None
            if value < 0:
                raise ValueError(f"{key}={raw!r}: must be >= 0")
            return value

        return cls(
            gpu_hour=number("FEDMOE_PRICE_GPU_HOUR", 0.0),
            million_tokens=number("FEDMOE_PRICE_MILLION_TOKENS", 0.0),
            member_gpus=number("FEDMOE_MEMBER_GPUS", 1.0),
            server_gpus=number("FEDMOE_SERVER_GPUS", 1.0),
        )

    def as_env(self) -> dict[str, str]:
        return {
            "FEDMOE_PRICE_GPU_HOUR": repr(self.gpu_hour),
            "FEDMOE_PRICE_MILLION_TOKENS": repr(self.million_tokens),
            "FEDMOE_MEMBER_GPUS": repr(self.member_gpus),
            "FEDMOE_SERVER_GPUS": repr(self.server_gpus),
        }


@dataclass(frozen=True)
class Cost:
    gpu_hours: float
    tokens: int
    compute: float  # price_gpu_hour * gpu_hours
    token: float  # price_million_tokens * tokens / 1e6

    @property
    def total(self) -> float:
        return self.compute + self.token


def estimate_cost(round_seconds: float, member_seconds: Sequence[float], tokens: int, prices: Prices) -> Cost:
    gpu_hours = (prices.member_gpus * sum(member_seconds) + prices.server_gpus * round_seconds) / 3600.0
    return Cost(gpu_hours, tokens, prices.gpu_hour * gpu_hours, prices.million_tokens * tokens / 1e6)


def manifest_cost(manifest: Mapping[str, Any], prices: Prices) -> Cost:
    """The cost of a committed round from its manifest (round 0, the initial state, costs 0)."""
    members = manifest.get("members", [])
    if not members:
        return Cost(0.0, 0, 0.0, 0.0)
    return estimate_cost(
        float(manifest.get("seconds", 0.0)),
        [float(m.get("seconds", 0.0)) for m in members],
        sum(int(m.get("num_tokens", 0)) for m in members),
        prices,
    )


class PrometheusReporter:
    """Updates the operator's metrics from the round loop's events; forwards them to `inner`."""

    def __init__(self, inner: Reporter | None = None, *, prices: Prices | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import (  # imported only when metrics are on
            CollectorRegistry,
            Counter,
            Gauge,
        )

        self.inner = inner
        self.prices = prices or Prices()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.round = Gauge("fedmoe_round", "Last committed round", registry=r)
        self.round_in_progress = Gauge("fedmoe_round_in_progress", "Round being run (0: none)", registry=r)
        self.num_rounds = Gauge("fedmoe_rounds_configured", "num-rounds of the run", registry=r)
        self.rounds = Counter("fedmoe_rounds_committed", "Rounds committed by this ServerApp process", registry=r)
        self.val_loss = Gauge("fedmoe_validation_loss", "Validation loss after the last committed round",
                              ["domain"], registry=r)
        self.members_sent = Gauge("fedmoe_round_members_sent", "Members the current round was sent to", registry=r)
        self.members_replied = Gauge("fedmoe_round_members_replied", "Replies received in the current round", registry=r)
        self.members = Gauge("fedmoe_last_round_members", "Members whose update the last round aggregated", registry=r)
        self.rejected = Counter("fedmoe_updates_rejected", "Replies refused (error, invalid update)", registry=r)
        self.round_seconds = Gauge("fedmoe_last_round_seconds", "Wall time of the last committed round", registry=r)
        self.seconds = Counter("fedmoe_round_seconds", "Wall time of committed rounds", registry=r)
        self.bytes_up = Counter("fedmoe_bytes_up", "Update bytes received from members", registry=r)
        self.bytes_down = Counter("fedmoe_bytes_down", "State bytes sent to members", registry=r)
        self.round_bytes_up = Gauge("fedmoe_last_round_bytes_up", "Update bytes received in the last round", registry=r)
        self.round_bytes_down = Gauge("fedmoe_last_round_bytes_down", "State bytes sent in the last round", registry=r)
        self.member_bytes_up = Counter("fedmoe_member_bytes_up", "Update bytes per member", ["member"], registry=r)
        self.member_tokens = Counter("fedmoe_member_tokens", "Training tokens per member (self-reported, bounded)",
                                     ["member"], registry=r)
        self.tokens = Counter("fedmoe_tokens", "Training tokens of aggregated updates", registry=r)
        self.share = Gauge("fedmoe_contribution_share", "Cumulative contribution share", ["member"], registry=r)
        self.gpu_hours = Counter("fedmoe_estimated_gpu_hours", "GPU-hours billed (see the cost formula)", registry=r)
        self.cost = Counter("fedmoe_estimated_cost", "Estimated cost (configured prices)", ["kind"], registry=r)
        self.dp_member_epsilon = Gauge("fedmoe_dp_member_epsilon",
                                       "Member-level DP: epsilon the consortium's sums have spent so far (dp-member-epsilon > 0)",
                                       registry=r)
        self.dp_record_epsilon = Gauge("fedmoe_dp_record_epsilon",
                                       "Record-level DP: epsilon a member reported spent so far (its last aggregated reply)",
                                       ["member"], registry=r)
        self.round_cost = Gauge("fedmoe_last_round_estimated_cost", "Estimated cost of the last round", registry=r)
        self.notes = Counter("fedmoe_notes", "Warnings from the round loop (rejections, timeouts)", registry=r)
        self.price = Gauge("fedmoe_price", "Configured price", ["unit"], registry=r)
        self.price.labels("gpu_hour").set(self.prices.gpu_hour)
        self.price.labels("million_tokens").set(self.prices.million_tokens)
        for kind in ("compute", "tokens"):
            self.cost.labels(kind)  # present from the start, at 0

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        self.round.set(first_round - 1)
        self.num_rounds.set(num_rounds)
        if self.inner is not None:
            self.inner.start(first_round, num_rounds, resumed)

    def round_started(self, rnd: int, num_members: int) -> None:
        self.round_in_progress.set(rnd)
        self.members_sent.set(num_members)
        self.members_replied.set(0)
        if self.inner is not None:
            self.inner.round_started(rnd, num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        self.members_replied.set(done)
        if self.inner is not None:
            self.inner.member_done(rnd, done, total)

    def round_finished(self, summary: RoundSummary) -> None:
        self.round.set(summary.round)
        self.round_in_progress.set(0)
        self.rounds.inc()
        for domain, loss in summary.val_loss.items():
            self.val_loss.labels(domain).set(loss)
        self.members.set(len(summary.members))
        self.rejected.inc(len(summary.rejected))
        self.round_seconds.set(summary.seconds)
        self.seconds.inc(summary.seconds)
        self.bytes_up.inc(summary.bytes_up)
        self.bytes_down.inc(summary.bytes_down)
        self.round_bytes_up.set(summary.bytes_up)
        self.round_bytes_down.set(summary.bytes_down)
        tokens = 0
        for m in summary.members:
            self.member_bytes_up.labels(m.member).inc(m.bytes_up)
            self.member_tokens.labels(m.member).inc(m.num_tokens)
            tokens += m.num_tokens
            if m.dp_epsilon is not None:
                self.dp_record_epsilon.labels(m.member).set(m.dp_epsilon)
        self.tokens.inc(tokens)
        for member, share in summary.shares.items():
            self.share.labels(member).set(share)
        if summary.dp_member_epsilon is not None:
            self.dp_member_epsilon.set(summary.dp_member_epsilon)
        cost = estimate_cost(summary.seconds, [m.seconds for m in summary.members], tokens, self.prices)
        self.gpu_hours.inc(cost.gpu_hours)
        self.cost.labels("compute").inc(cost.compute)
        self.cost.labels("tokens").inc(cost.token)
        self.round_cost.set(cost.total)
        if self.inner is not None:
            self.inner.round_finished(summary)

    def note(self, text: str) -> None:
        self.notes.inc()
        if self.inner is not None:
            self.inner.note(text)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics from a daemon thread of this process."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)


def with_metrics(inner: Reporter | None = None, env: Mapping[str, str] | None = None) -> Reporter:
    """`inner` wrapped in a PrometheusReporter serving on FEDMOE_METRICS_PORT, or `inner` as it
    is when that is unset. A busy port or bad price is logged, never fatal to the run."""
    env = os.environ if env is None else env
    inner = inner or LogReporter()
    port = env.get("FEDMOE_METRICS_PORT", "")
    if not port:
        return inner
    try:
        reporter = PrometheusReporter(inner, prices=Prices.from_env(env))
        reporter.serve(int(port), env.get("FEDMOE_METRICS_ADDR", "127.0.0.1"))
    except (OSError, ValueError, ImportError) as exc:
        log.warning("fedmoe: metrics endpoint not started (FEDMOE_METRICS_PORT=%s): %s", port, exc)
        return inner
    log.info("fedmoe: metrics on http://%s:%s/metrics", env.get("FEDMOE_METRICS_ADDR", "127.0.0.1"), port)
    return reporter
