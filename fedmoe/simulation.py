"""An embedded consortium: the fedmoe ServerApp and ClientApp in Flower's simulation engine.

Flower runs the ServerApp in a thread of this process (so the CLI's progress shows live) and
the members as Ray actors. Nothing here starts a SuperLink.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from server.config import RunConfig
from server.workspace import Workspace
from server.summary import Reporter, RoundSummary


class SimulationFailed(RuntimeError):
    """The ServerApp raised; the committed rounds on disk are intact."""


class _Collecting:
    """Wraps a reporter and keeps the summaries and notes for the caller."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.summaries: list[RoundSummary] = []
        self.notes: list[str] = []

    def start(self, first_round: int, num_rounds: int, resumed: bool) -> None:
        self.inner.start(first_round, num_rounds, resumed)

    def round_started(self, rnd: int, num_members: int) -> None:
        self.inner.round_started(rnd, num_members)

    def member_done(self, rnd: int, done: int, total: int) -> None:
        self.inner.member_done(rnd, done, total)

    def round_finished(self, summary: RoundSummary) -> None:
        self.summaries.append(summary)
        self.inner.round_finished(summary)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.inner.note(text)


def flower_environment(workspace: Path) -> None:
    """Keep Flower private to the workspace: no telemetry, no dependency re-install."""
    os.environ.setdefault("FLWR_HOME", str(workspace / "flwr-home"))
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def simulate(
    config: RunConfig,
    reporter: Reporter,
    *,
    num_members: int | None = None,
    run_name: str = "default",
    cpus_per_member: int = 2,
    free_rider: bool = False,
) -> _Collecting:
    """Run the configured rounds with one simulated SuperNode per member of the workspace, and
    with `free_rider` one more that plays the labelled free rider (fedmoe/free_rider.py)."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from fedmoe.free_rider import demo_client_app
    from server.app import make_app

    ws = Workspace(config.workspace_path)
    members = ws.members()
    if not members:
        raise SimulationFailed(f"{ws.members_dir}: no members (run `fedmoe init`)")
    n = min(num_members or len(members), len(members))
    if free_rider:
        client_app = demo_client_app(ws.root, partition=n)
    flower_environment(ws.root)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    collecting = _Collecting(reporter)
    errors: list[BaseException] = []

    server_app = make_app(config, collecting, run_name=run_name, errors=errors)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n + int(free_rider),
            backend_config={
                "client_resources": {"num_cpus": cpus_per_member, "num_gpus": 0.0},
                "init_args": {"num_cpus": max(cpus_per_member, os.cpu_count() or 1), "include_dashboard": False},
            },
        )
    except Exception as exc:  # Flower re-raises what the ServerApp raised; keep our reason
        raise SimulationFailed(str(errors[0] if errors else exc)) from exc
    if errors:
        raise SimulationFailed(str(errors[0])) from errors[0]
    return collecting
