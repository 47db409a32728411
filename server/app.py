"""The fedmoe ServerApp: read the run config, delegate to the round loop in server.rounds."""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from model.chatter import silence_library_chatter
from server.config import RunConfig
from server.metrics import with_metrics
from server.rounds import run_rounds
from server.summary import EventReporter, Reporter

PROGRESS_ENV = "FEDMOE_PROGRESS"  # "events": progress as JSON lines for fedmoe/simulation.py

silence_library_chatter()  # this module is a process's entry point (SuperLink, simulation)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read Flower's run config and run its rounds; progress through the log, or as events when
    the caller streams them (FEDMOE_PROGRESS=events, set by fedmoe/simulation.py)."""
    events = EventReporter() if os.environ.get(PROGRESS_ENV) == "events" else None
    reporter: Reporter | None = events
    try:
        config = RunConfig.from_user_config(context.run_config)
        # FEDMOE_METRICS_PORT set (fedmoe serve): the reporter also serves Prometheus metrics
        run_rounds(grid, config, with_metrics(reporter), run_name=config.run_name)
    except Exception as exc:
        if events is not None:
            events.failed(str(exc) or type(exc).__name__)
        raise
    if events is not None:
        events.finished()
