"""The fedmoe ServerApp: read the run config, delegate to the round loop in server.rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from model.chatter import silence_library_chatter
from server.config import RunConfig
from server.metrics import with_metrics
from server.rounds import run_rounds
from server.summary import Reporter

silence_library_chatter()  # this module is a process's entry point (SuperLink, simulation)


def make_app(
    config: RunConfig | None = None,
    reporter: Reporter | None = None,
    run_name: str = "default",
    errors: list[BaseException] | None = None,
) -> ServerApp:
    """A ServerApp; `config` set: an embedded run (fedmoe CLI), else Flower's run config.

    `errors` collects what the round loop raised (Flower's simulation only logs it).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_config = config if config is not None else RunConfig.from_user_config(context.run_config)
            # FEDMOE_METRICS_PORT set (fedmoe serve): the reporter also serves Prometheus metrics
            run_rounds(grid, run_config, with_metrics(reporter), run_name=run_name)
        except BaseException as exc:
            if errors is not None:
                errors.append(exc)
            raise

    return app


app = make_app()
