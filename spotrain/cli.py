"""The `spotrain` command: thin; parses, loads the spec, calls the package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train one model on spot VMs within a hard budget.")


@app.callback()
def _root() -> None:
    """Train one model on spot VMs within a hard budget."""


@app.command()
def agent(user_data: Path = typer.Option(..., "--user-data", help="the agent's user-data JSON")) -> None:
    """The worker daemon (started on each VM by cloud-init/systemd, or by the local provider)."""
    from spotrain.agents.daemon import main as agent_main

    raise typer.Exit(agent_main(user_data))


def main() -> None:
    app()
