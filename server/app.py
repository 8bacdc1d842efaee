"""ServerApp: ``flwr run .`` starts here."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import from_run_config
from common.console import configure_logging
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = from_run_config(context.run_config)
    run_federation(grid, cfg)
