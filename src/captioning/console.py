"""What every command does with a refused input: one line naming the file or setting, and its exit status.

Below the CLI, so that commands defined elsewhere (``deploy.command``) fail the same way.
"""

from __future__ import annotations

import typer

from captioning.errors import DiskFullError
from captioning.io import exit_process
from captioning.redact import redact


def fail(exc: Exception) -> None:
    """Exit 2 for what was refused up front, 1 for a full disk."""
    typer.echo(redact(f"error: {exc}"), err=True)
    if isinstance(exc, DiskFullError):
        exit_process(1)
    raise typer.Exit(2)
