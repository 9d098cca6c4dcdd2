"""Command-line entry point. Parses arguments and calls library functions; no logic here."""
from __future__ import annotations

import sys

import click

from pipeline.errors import ConfigError, PipelineError


@click.group()
def main() -> None:
    """Find objects in very large imagery with RetinaNet on Ray."""


def fail(err: Exception) -> "NoReturn":  # noqa: F821
    """Print a PipelineError for a user and exit: 2 for bad configuration, 1 otherwise."""
    click.echo(f"error: {err}", err=True)
    sys.exit(2 if isinstance(err, ConfigError) else 1)


if __name__ == "__main__":
    main()
