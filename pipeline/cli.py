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


@main.command()
@click.option("--chips", default=4, show_default=True, help="number of synthetic chips")
@click.option("--size", default=256, show_default=True, help="chip size in pixels")
@click.option("--backbone", default="resnet18", show_default=True)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
def demo(chips: int, size: int, backbone: str, precision: str) -> None:
    """Build an (untrained) RetinaNet and run it on synthetic chips: a smoke test of the model."""
    from pipeline.demo import run_demo

    for row in run_demo(chips, size, backbone, precision):
        click.echo(f"chip {row['chip']}: {row['detections']} detections, top score {row['top_score']:.3f} "
                   f"({row['seconds'] * 1000:.0f} ms/chip on {row['device']}, {row['precision']})")


if __name__ == "__main__":
    main()
