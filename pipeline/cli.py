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


def _load(job: str, overrides: tuple[str, ...]):
    from pipeline.spec import check_runnable, load_job

    spec = load_job(job, list(overrides))
    check_runnable(spec)
    return spec


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a job field")
def validate(job: str, overrides: tuple[str, ...]) -> None:
    """Check a job file without running it (exit code 2 and the bad field if it is invalid)."""
    try:
        spec = _load(job, overrides)
    except PipelineError as err:
        fail(err)
    click.echo(f"{job}: ok ({spec.name})")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a job field")
@click.option("--run-id", default=None, help="name of this run (default: timestamp + random suffix)")
@click.option("--force", is_flag=True, help="reprocess scenes already committed for this model and job")
def run(job: str, overrides: tuple[str, ...], run_id: str | None, force: bool) -> None:
    """Run a job: tile scenes, detect on Ray actors, merge seams, commit GeoParquet."""
    import json

    from pipeline.execution import run_job

    try:
        spec = _load(job, overrides)
        report = run_job(spec, run_id=run_id, force=force)
    except PipelineError as err:
        fail(err)
    summary = {k: report[k] for k in ("run_id", "detections", "chips_read", "chips_skipped_empty",
                                      "chips_per_second", "wall_seconds", "report_path")}
    summary["scenes_ok"] = len(report["scenes_ok"])
    summary["scenes_failed"] = report["scenes_failed"]
    summary["chips_quarantined"] = report["chips_quarantined"]
    click.echo(json.dumps(summary, indent=2))
    sys.exit(report["exit_code"])


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--scenes", default=4, show_default=True, help="number of scenes")
@click.option("--size", default=2048, show_default=True, help="scene side in pixels")
@click.option("--seed", default=0, show_default=True, help="random seed (same seed, same files)")
@click.option("--bands", default=3, show_default=True, type=click.Choice(["3", "4"]),
              help="3 = RGB, 4 = RGB + NIR")
@click.option("--dtype", default="uint8", show_default=True, type=click.Choice(["uint8", "uint16"]))
@click.option("--nodata-regions", is_flag=True, help="add nodata (0) regions to every scene")
def synth(out_dir: str, scenes: int, size: int, seed: int, bands: str, dtype: str,
          nodata_regions: bool) -> None:
    """Write synthetic georeferenced scenes plus truth.json (COCO) and truth.geojson."""
    from pipeline.synth import synthesize

    try:
        paths = synthesize(out_dir, scenes, size, seed, bands=int(bands), dtype=dtype,
                           nodata_regions=nodata_regions)
    except PipelineError as err:
        fail(err)
    except ValueError as err:
        fail(ConfigError(str(err)))
    for path in paths:
        click.echo(str(path))


@main.command()
@click.argument("table", type=click.Path(file_okay=False))
@click.argument("sql")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "csv", "json"]))
def query(table: str, sql: str, fmt: str) -> None:
    """Run SQL on a table's committed rows, the view `detections` (DuckDB)."""
    from pipeline.query import query_text

    try:
        text = query_text(table, sql, fmt)
    except PipelineError as err:
        fail(err)
    click.echo(text)


@main.command()
@click.argument("table", type=click.Path(file_okay=False))
@click.argument("scene_path")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write")
@click.option("--run-id", default=None, help="draw only this run's detections")
@click.option("--job", "job_name", default=None, help="draw only this job's detections")
@click.option("--max-size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="longer side of the picture, px")
def render(table: str, scene_path: str, out: str, run_id: str | None, job_name: str | None, max_size: int) -> None:
    """Write a quicklook PNG of a scene with its committed detections, coloured by class."""
    from pipeline.render import render_quicklook

    try:
        summary = render_quicklook(table, scene_path, out, run_id=run_id, max_size=max_size, job_name=job_name)
    except PipelineError as err:
        fail(err)
    classes = ", ".join(f"{k} {v}" for k, v in summary["classes"].items()) or "none"
    click.echo(f"{summary['path']}: {summary['detections']} detections ({classes})")


if __name__ == "__main__":
    main()
