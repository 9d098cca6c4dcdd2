"""Command-line entry point. Parses arguments and calls library functions; no logic here.

One rule for every command (README.md, "The command line"): a detection table is the first
argument (TABLE); ``--job`` is always a job file; ``-o`` is ``--out``; ``--set`` reaches any
depth of a job; the exit code says 0 complete, 1 incomplete, 2 cannot start, 3 internal error.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import traceback
from typing import Any, Literal, NoReturn

import click

from pipeline.errors import ConfigError, PipelineError, TrainingError
from retinanet.options import PRECISIONS

EXIT_COMPLETE = 0      # everything asked for was done
EXIT_INCOMPLETE = 1    # the work ran, part of it failed: scenes partial or failed, training failed
EXIT_CANNOT_START = 2  # bad job or option, missing input, unreachable table, cluster or source
EXIT_INTERNAL = 3      # an exception nobody expected: a bug, its traceback kept in a file


def exit_code_of(err: Exception) -> int:
    """The exit code of an error the pipeline names: training that failed on its way is
    incomplete work (1); every other named error stopped the command before its work (2)."""
    return EXIT_INCOMPLETE if isinstance(err, TrainingError) else EXIT_CANNOT_START


def fail(err: Exception) -> NoReturn:
    """Print a named error for a user and exit with :func:`exit_code_of`."""
    click.echo(f"error: {err}", err=True)
    sys.exit(exit_code_of(err))


def internal_error(err: Exception, ctx: click.Context) -> NoReturn:
    """An exception nobody expected: exit 3 with its type and message. The traceback goes to a
    file under the cache folder (for a bug report), and to stderr too with ``pipeline --traceback``
    or the command's own ``--verbose``."""
    from pipeline.io.objstore import cache_dir

    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    command = f"pipeline {ctx.info_name}"
    where = "not written"
    try:
        folder = cache_dir() / "errors"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = folder / f"{stamp}-{ctx.info_name}-{os.getpid()}.txt"
        params = json.dumps(ctx.params, default=str)
        try:
            versions = version_text()
        except Exception as version_err:  # the broken library may be one of those asked
            versions = f"versions unknown ({type(version_err).__name__}: {version_err})"
        path.write_text(f"{command} {params}\n{versions}\n\n{trace}", encoding="utf-8")
        where = str(path)
    except OSError as io_err:  # a read-only cache must not hide the error itself
        where = f"not written ({io_err})"
    show = bool(ctx.find_root().params.get("show_traceback") or ctx.params.get("verbose"))
    if show or where.startswith("not written"):
        click.echo(trace.rstrip(), err=True)
    click.echo(f"internal error in {command}: {type(err).__name__}: {err}\n"
               f"this is a bug; the traceback is in {where}" + ("" if show else " (pipeline --traceback prints it)"),
               err=True)
    sys.exit(EXIT_INTERNAL)


class PipelineCommand(click.Command):
    """A command whose errors end in the documented exit codes: a PipelineError is printed
    as ``error: ...`` (exit 2, or 1 for training that failed), any other exception is an
    internal error (exit 3). Click's own exits and usage errors (exit 2) pass through."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except PipelineError as err:
            fail(err)
        except Exception as err:  # the one place that turns a bug into exit 3
            internal_error(err, ctx)


class PipelineGroup(click.Group):
    command_class = PipelineCommand


def library_versions() -> list[tuple[str, str]]:
    """(name, version) of the pipeline and of the libraries whose versions change results or
    compatibility. Package metadata, not imports (torch, Ray and OpenVINO load in seconds);
    GDAL's version is the one rasterio was built with, so rasterio is imported here."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    try:
        import rasterio

        gdal = f"{rasterio.__gdal_version__} (rasterio {rasterio.__version__})"
    except ImportError:
        gdal = "not installed (no rasterio)"
    return [("pipeline", installed("retinanet-pipeline")), ("Python", platform.python_version()),
            ("torch", installed("torch")), ("Ray", installed("ray")), ("GDAL", gdal),
            ("OpenVINO", installed("openvino"))]


def version_text() -> str:
    return "\n".join(f"{name} {value}" for name, value in library_versions())


def print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_text())
    ctx.exit()


def job_selection(job_file: str | None, job_name: str | None) -> tuple[str | None, str | None]:
    """``--job FILE`` / ``--job-name NAME`` -> (the job name to select, the job file's output.table).

    ``--job`` is a job file in every command. A value that is no file but reads as a job name
    (``--job satellite-nightly``, the old meaning in eval and render) is still taken as one,
    with a note, so that scripts keep working while they move to ``--job-name``."""
    from pipeline.config.spec import load_job

    if job_file is None:
        return job_name, None
    looks_like_name = os.sep not in job_file and "/" not in job_file and not job_file.endswith((".yaml", ".yml"))
    if looks_like_name and not os.path.isfile(job_file):
        click.echo(f"note: --job takes a job file; --job {job_file} as a job's name is deprecated: "
                   f"write --job-name {job_file}", err=True)
        named, table = job_file, None
    else:
        spec = load_job(job_file)
        named, table = spec.name, spec.output.table
    if job_name is not None and job_name != named:
        raise ConfigError(f"--job {job_file} is job {named!r} but --job-name says {job_name!r}; give one of them")
    return named, table


def one_table(argument: str | None, option: str | None, fallback: str | None = None) -> str:
    """The detection table given as TABLE or as ``--table`` (the same one when both), else
    ``fallback`` (a job file's output.table)."""
    if argument is not None and option is not None:
        same = argument == option or (
            "://" not in argument + option and os.path.abspath(argument) == os.path.abspath(option))
        if not same:
            raise ConfigError(f"the table is given twice and the two differ: TABLE {argument} and --table {option}; "
                              "give it once")
    table = argument if argument is not None else option if option is not None else fallback
    if table is None:
        raise ConfigError("no detection table: give it as the first argument (TABLE), or --job JOB.yaml to "
                          "read its output.table")
    return table


@click.group(cls=PipelineGroup)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=print_versions,
              help="Show the versions of pipeline, Python, torch, Ray, GDAL and OpenVINO, and exit.")
@click.option("--traceback", "show_traceback", is_flag=True, envvar="PIPELINE_TRACEBACK",
              help="On an internal error (exit 3) print the traceback too (it is always written to a file).")
def main(show_traceback: bool) -> None:
    """Find objects in very large imagery with RetinaNet on Ray.

    \b
    Conventions, the same in every command:
      TABLE        a detection table, always the first argument (eval also takes --table)
      --job FILE   always a job file; --job-name NAME selects a job by its name
      -o, --out    what the command writes
      --set K=V    override a job field at any depth: --set train.augment.hflip=false
      --address    submit: the Ray dashboard; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS

    \b
    Exit codes:
      0  complete: every scene done (or done before), the command did all it was asked
      1  incomplete: some scenes partial or failed (run, submit --follow), or training failed
      2  cannot start: bad job, field or option, missing input, unreachable table or cluster
      3  internal error: an unexpected exception (a bug); its type is printed and its
         traceback written under the cache folder (pipeline --traceback prints it)
    """


@main.command()
@click.option("--chips", default=4, show_default=True, help="number of synthetic chips")
@click.option("--size", default=256, show_default=True, help="chip size in pixels")
@click.option("--backbone", default="resnet18", show_default=True)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS))
def demo(chips: int, size: int, backbone: str, precision: str) -> None:
    """Build an (untrained) RetinaNet and run it on synthetic chips: a smoke test of the model."""
    from pipeline.tools.demo import run_demo

    for row in run_demo(chips, size, backbone, precision):
        click.echo(f"chip {row['chip']}: {row['detections']} detections, top score {row['top_score']:.3f} "
                   f"({row['seconds'] * 1000:.0f} ms/chip on {row['device']}, {row['precision']})")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a job field, at any depth: train.augment.hflip=false (repeatable)")
def validate(job: str, overrides: tuple[str, ...]) -> None:
    """Check a job and every scene it names against the model, without running it
    (exit code 2 and every problem if it cannot run)."""
    from pipeline.config.spec import load_job
    from pipeline.run.graph import preflight

    try:
        spec = load_job(job, list(overrides))
        checked = preflight(spec)
    except PipelineError as err:
        fail(err)
    for warning in checked.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{job}: ok ({spec.name}: {len(checked.inputs.scenes)} scenes, model {checked.model.location})")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a job field, at any depth: train.augment.hflip=false (repeatable)")
@click.option("--run-id", default=None, help="name of this run (default: timestamp + random suffix)")
@click.option("--force", is_flag=True, help="reprocess scenes already committed for this model and job")
@click.option("--verbose", is_flag=True, help="show Ray's own log lines and the workers' output")
def run(job: str, overrides: tuple[str, ...], run_id: str | None, force: bool, verbose: bool) -> None:
    """Run a job: tile scenes, detect on Ray actors, merge seams, commit GeoParquet.

    Exit code 0 when every scene is complete (or was already), 1 while any scene is
    partial or failed, 2 when the job cannot start (bad field, no scene found)."""
    from pipeline.config.spec import load_job
    from pipeline.run.graph import run_job

    try:
        spec = load_job(job, list(overrides))
        report = run_job(spec, run_id=run_id, force=force, verbose=verbose)
    except PipelineError as err:
        fail(err)
    summary = {k: report[k] for k in ("run_id", "detections", "chips_read", "chips_skipped_empty",
                                      "chips_per_second", "wall_seconds", "startup_seconds", "bottleneck",
                                      "report_path")}
    summary["scenes_ok"] = len(report["scenes_ok"])
    summary["scenes_skipped_done"] = len(report["scenes_skipped_done"])
    summary["scenes_partial"] = report["scenes_partial"]
    summary["scenes_failed"] = report["scenes_failed"]
    summary["inputs_unmatched"] = report["inputs_unmatched"]
    summary["warnings"] = report["warnings"]
    summary["chips_quarantined"] = report["chips_quarantined"]
    click.echo(json.dumps(summary, indent=2))
    sys.exit(report["exit_code"])


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--scenes", default=4, show_default=True, help="number of scenes")
@click.option("--size", default=2048, show_default=True, help="scene side in pixels")
@click.option("--seed", default=0, show_default=True, help="random seed (same seed, same files)")
@click.option("--band-count", default=3, show_default=True, type=click.Choice(["3", "4"]),
              help="3 = RGB, 4 = RGB + NIR (--bands elsewhere is a list of band numbers)")
@click.option("--dtype", default="uint8", show_default=True, type=click.Choice(["uint8", "uint16"]))
@click.option("--nodata-regions", is_flag=True, help="add nodata (0) regions to every scene")
@click.option("--kind", default="satellite", show_default=True, type=click.Choice(["satellite", "inspection"]),
              help="satellite: georeferenced GeoTIFFs (UTM), truth.json and truth.geojson; inspection: "
                   "plain 8-bit RGB PNGs of metal parts with defects (no georeferencing), truth.json")
def synth(out_dir: str, scenes: int, size: int, seed: int, band_count: str, dtype: str,
          nodata_regions: bool, kind: str) -> None:
    """Write synthetic labelled images: georeferenced scenes plus truth.json (COCO) and
    truth.geojson, or (--kind inspection) factory images plus truth.json."""
    from pipeline.tools.synth import synthesize, synthesize_inspection

    try:
        if kind == "inspection":
            ctx = click.get_current_context()
            given = [f"--{name.replace('_', '-')}" for name in ("band_count", "dtype", "nodata_regions")
                     if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
            if given:
                raise ConfigError(f"--kind inspection writes 8-bit RGB PNGs without nodata; "
                                  f"{', '.join(given)} apply to --kind satellite only")
            paths = synthesize_inspection(out_dir, scenes, size, seed)
        else:
            paths = synthesize(out_dir, scenes, size, seed, bands=int(band_count), dtype=dtype,
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
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="write the result to this file instead: .gpkg, .fgb, .geojson, .parquet (GeoParquet) or .csv; "
                   "geometry and CRS kept")
@click.option("--aoi", type=click.Path(dir_okay=False), default=None,
              help="a vector file (GeoJSON, GeoPackage, shapefile...) of polygons, as the table `aoi` in the "
                   "table's CRS")
def query(table: str, sql: str, fmt: Literal["table", "csv", "json"], out: str | None, aoi: str | None) -> None:
    """Run SQL on a table's committed rows, the view `detections` (DuckDB, with its ST_ spatial functions)."""
    from pipeline.query import query_text, query_to_file

    try:
        if out is not None:
            rows = query_to_file(table, sql, out, aoi=aoi)
            text = f"{out}: {rows} row{'s' if rows != 1 else ''}"
        else:
            text = query_text(table, sql, fmt, aoi=aoi)
    except PipelineError as err:
        fail(err)
    click.echo(text)


@main.command()
@click.argument("table")
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds: anything younger is kept (commits and reads in flight)")
def vacuum(table: str, dry_run: bool, grace: float) -> None:
    """Finish interrupted commits, then remove superseded files, orphans and stale staging."""
    from pipeline.table.maintenance import vacuum as vacuum_table

    try:
        found = vacuum_table(table, grace_s=grace, dry_run=dry_run)
    except PipelineError as err:
        fail(err)
    verb = "would remove" if dry_run else "removed"
    for kind, paths in found.items():
        for path in paths:
            click.echo(f"{verb} {kind}: {path}")
    click.echo(f"{table}: {verb} " + ", ".join(f"{len(v)} {k}" for k, v in found.items()))


@main.command()
@click.argument("table")
@click.option("--date", "days", multiple=True, metavar="YYYY-MM-DD",
              help="compact this date partition (repeatable; default: every partition)")
@click.option("--min-files", default=2, show_default=True, type=click.IntRange(min=2),
              help="rewrite a partition only when it has at least this many files")
@click.option("--max-rows", default=1_000_000, show_default=True, type=click.IntRange(min=1),
              help="rows per compacted file at most")
@click.option("--dry-run", is_flag=True, help="say what would be rewritten, write nothing")
def compact(table: str, days: tuple[str, ...], min_files: int, max_rows: int, dry_run: bool) -> None:
    """Rewrite each date partition's small files into few large ones, one atomic commit per partition."""
    from pipeline.table.maintenance import compact as compact_table

    try:
        summaries = compact_table(table, days=list(days) or None, min_files=min_files, max_rows=max_rows,
                                  dry_run=dry_run)
    except PipelineError as err:
        fail(err)
    for s in summaries:
        if dry_run:
            verb = "would rewrite" if s["needed"] else "would leave"
        else:
            verb = "rewrote" if s["compacted"] else "left"
        click.echo(f"date={s['date']}: {verb} {s['files_before']} files -> {s['files_after']} ({s['rows']} rows)")
    done = sum(s["compacted"] for s in summaries)
    click.echo(f"{table}: {'would compact' if dry_run else 'compacted'} "
               f"{sum(s['needed'] for s in summaries) if dry_run else done} "
               f"of {len(summaries)} partitions")


@main.command()
@click.argument("table", type=click.Path(file_okay=False))
@click.argument("scene_path")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="picture to write: .tif a GeoTIFF, else a PNG (with .pgw world file and CRS beside it)")
@click.option("--run-id", default=None, help="draw only this run's detections")
@click.option("--job", "job_file", default=None, type=click.Path(dir_okay=False),
              help="job file: draw only its detections")
@click.option("--job-name", default=None, help="draw only the detections of the job of this name")
@click.option("--max-size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="longer side of the picture, px")
@click.option("--truth", default=None, type=click.Path(exists=True, dir_okay=False),
              help="ground truth (COCO, VOC, CSV or vector file): draw hits, false alarms and misses apart")
def render(table: str, scene_path: str, out: str, run_id: str | None, job_file: str | None, job_name: str | None,
           max_size: int, truth: str | None) -> None:
    """Write a georeferenced quicklook of a scene with its committed detections (TABLE: a folder or
    s3:// / gs:// prefix), coloured by class, or by hit / false alarm / miss against --truth."""
    from pipeline.render import render_quicklook, summary_line

    try:
        job_name, _ = job_selection(job_file, job_name)
        summary = render_quicklook(table, scene_path, out, run_id=run_id, max_size=max_size, job_name=job_name,
                                   truth=truth)
    except PipelineError as err:
        fail(err)
    click.echo(summary_line(summary))


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--address", default=None,
              help="Ray dashboard of the cluster, e.g. http://HEAD:8265 [default, as Ray's job CLI: "
                   "$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS]")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a job field, at any depth: train.augment.hflip=false (repeatable)")
@click.option("--run-id", default=None, help="name of the run (default: chosen on the cluster)")
@click.option("--force", is_flag=True, help="reprocess scenes already committed for this model and job")
@click.option("--submission-id", default=None, help="Ray job id to use (default: generated by Ray)")
@click.option("--follow", is_flag=True, help="stream the job's logs until it ends and exit with its status")
def submit(job: str, address: str | None, overrides: tuple[str, ...], run_id: str | None, force: bool,
           submission_id: str | None, follow: bool) -> None:
    """Submit a job to a Ray cluster as a Ray Job; print its id (see docs/operations.md)."""
    from pipeline.run.submit import follow_job, submit_job

    try:
        job_id, local = submit_job(address, job, list(overrides), run_id=run_id, force=force,
                                   submission_id=submission_id)
        click.echo(job_id)
        if local:
            click.echo("note: these local paths must exist on the cluster nodes: " + ", ".join(local), err=True)
        if follow:
            sys.exit(follow_job(address, job_id, write=lambda text: click.echo(text, nl=False)))
    except PipelineError as err:
        fail(err)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a job field, at any depth: train.augment.hflip=false (repeatable)")
@click.option("--resume", is_flag=True, help="continue the last run of train.output_dir from its latest checkpoint")
@click.option("--verbose", is_flag=True, help="show Ray's and Ray Train's own log lines and the workers' output")
def train(job: str, overrides: tuple[str, ...], resume: bool, verbose: bool) -> None:
    """Train the job's RetinaNet on its `train:` section with Ray Train (see docs/training.md)."""
    from pipeline.config.spec import load_job
    from pipeline.train.driver import train as run_training

    try:
        summary = run_training(load_job(job, list(overrides)), resume=resume, verbose=verbose)
    except PipelineError as err:
        fail(err)
    click.echo(json.dumps(summary, indent=2))


@main.command(name="eval")
@click.argument("table", required=False, type=click.Path(file_okay=False))
@click.option("--table", "table_option", default=None, type=click.Path(file_okay=False),
              help="the detection table, as TABLE (kept for older scripts; both must agree)")
@click.option("--truth", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="ground truth: COCO JSON, VOC XML, CSV or a vector file (repeatable)")
@click.option("--run-id", default=None, help="evaluate only this run's committed scenes")
@click.option("--job", "job_file", default=None, type=click.Path(dir_okay=False),
              help="job file: evaluate only its committed scenes; TABLE defaults to its output.table")
@click.option("--job-name", default=None, help="evaluate only the committed scenes of the job of this name")
@click.option("--voc", is_flag=True, help="also report PASCAL VOC AP@0.5 (all-point interpolation)")
@click.option("-o", "--out", "out_dir", default="eval", show_default=True, type=click.Path(file_okay=False),
              help="folder for eval.json and the precision-recall PNG")
@click.option("--label-field", default="label", show_default=True, help="vector truth: class attribute")
@click.option("--scene-field", default=None, help="vector truth: scene id attribute (multi-scene files)")
@click.option("--label-map", "label_map", multiple=True, metavar="DETECTED=TRUTH",
              help="read a detection label as a truth label, e.g. tree=Tree (repeatable, or comma-separated)")
def evaluate(table: str | None, table_option: str | None, truth: tuple[str, ...], run_id: str | None,
             job_file: str | None, job_name: str | None, voc: bool, out_dir: str, label_field: str,
             scene_field: str | None, label_map: tuple[str, ...]) -> None:
    """Scene-level COCO evaluation of a committed run against ground truth."""
    from pipeline.eval.evaluate import evaluate_table, format_table, parse_label_map

    try:
        job_name, job_table = job_selection(job_file, job_name)
        table = one_table(table, table_option, job_table)
        metrics = evaluate_table(table, list(truth), run_id=run_id, job_name=job_name, voc=voc, out_dir=out_dir,
                                 label_field=label_field, scene_field=scene_field,
                                 label_map=parse_label_map(label_map))
    except PipelineError as err:
        fail(err)
    click.echo(format_table(metrics))
    if metrics["unknown_labels"]:
        counts = ", ".join(f"{name!r} ({n})" for name, n in sorted(metrics["unknown_labels"].items()))
        click.echo(f"warning: detections labelled {counts} match no truth class ({', '.join(metrics['per_class'])}) "
                   "and were left out; map them with --label-map DETECTED=TRUTH", err=True)
    if metrics["truth_labels_unmatched"]:
        click.echo(f"warning: no detection carries the truth classes {', '.join(metrics['truth_labels_unmatched'])}",
                   err=True)
    if metrics["scenes_not_in_table"]:
        click.echo(f"note: {len(metrics['scenes_not_in_table'])} truth scenes are not committed in the table "
                   f"and were left out: {', '.join(metrics['scenes_not_in_table'][:10])}", err=True)
    for kind, path in metrics.get("files", {}).items():
        click.echo(f"{kind}: {path}")


@main.command(name="eval-checkpoint")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--job", default=None, type=click.Path(dir_okay=False),
              help="job file: evaluate on its training data's validation chips (its train: section)")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a field of --job, at any depth (repeatable)")
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "train"]),
              help="with --job: which split's chips")
@click.option("--images", multiple=True, help="labelled scenes (files or globs), instead of --job")
@click.option("--labels", multiple=True, help="label files for --images (COCO, VOC, CSV, vector)")
@click.option("--chip-size", default=512, show_default=True, type=click.IntRange(min=32))
@click.option("--overlap", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--bands", default=None, help="1-based bands, e.g. 1,2,3 (default: all non-alpha)")
@click.option("--region", default=None, metavar="SIDE:FRACTION",
              help="only the held-out band of each scene, e.g. right:0.3 or bottom:0.2")
@click.option("--untrained", is_flag=True, help="evaluate a fresh model of the checkpoint's config (baseline)")
@click.option("--voc", is_flag=True, help="also report PASCAL VOC AP@0.5")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="write JSON and PNG here")
def eval_checkpoint(checkpoint: str, job: str | None, overrides: tuple[str, ...], split: str,
                    images: tuple[str, ...], labels: tuple[str, ...], chip_size: int, overlap: int,
                    bands: str | None, region: str | None, untrained: bool, voc: bool, out_dir: str | None) -> None:
    """Chip-level COCO evaluation of a checkpoint on labelled data, without running the pipeline."""
    from pipeline.eval.evaluate import evaluate_checkpoint, format_table
    from pipeline.train.driver import evaluate_checkpoint_on_job

    try:
        if job is not None:
            from pipeline.config.spec import load_job

            metrics = evaluate_checkpoint_on_job(checkpoint, load_job(job, list(overrides)), split=split, voc=voc,
                                                 out_dir=out_dir, untrained=untrained)
        else:
            if not images or not labels:
                raise ConfigError("eval-checkpoint: give --job JOB.yaml, or --images and --labels")
            band_list = [int(b) for b in bands.split(",")] if bands else None
            side_fraction = None
            if region:
                side, _, fraction = region.partition(":")
                if side not in ("right", "bottom") or not fraction:
                    raise ConfigError(f"--region: expected right:FRACTION or bottom:FRACTION, got {region!r}")
                side_fraction = (side, float(fraction))
            metrics = evaluate_checkpoint(checkpoint, list(images), list(labels), chip_size, overlap, band_list,
                                          side_fraction, voc=voc, out_dir=out_dir, untrained=untrained)
    except PipelineError as err:
        fail(err)
    except ValueError as err:
        fail(ConfigError(str(err)))
    click.echo(format_table(metrics))
    for kind, path in metrics.get("files", {}).items():
        click.echo(f"{kind}: {path}")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override a job field, at any depth: train.augment.hflip=false (repeatable)")
def anchors(job: str, overrides: tuple[str, ...]) -> None:
    """Fit anchor sizes and ratios to the job's training boxes; print the matched share."""
    from pipeline.config.spec import load_job
    from pipeline.train.driver import fit_job_anchors

    try:
        fit = fit_job_anchors(load_job(job, list(overrides)))
    except PipelineError as err:
        fail(err)
    click.echo(f"boxes: {fit.boxes}; share matched by some anchor at centre-aligned IoU >= 0.5: "
               f"{fit.share_before:.3f} (default anchors) -> {fit.share_after:.3f} (fitted); "
               f"mean best IoU {fit.mean_iou_before:.3f} -> {fit.mean_iou_after:.3f}")
    click.echo(json.dumps(fit.to_dict()))
    click.echo("to train with them: train.fit_anchors: true")


@main.command(name="import")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="checkpoint to write (model.checkpoint)")
@click.option("--kind", type=click.Choice(["auto", "torchvision", "deepforest"]), default="auto", show_default=True,
              help="what SOURCE is; auto: a Lightning checkpoint or model.* keys mean DeepForest")
@click.option("--classes", default=None, metavar="NAME,NAME,...",
              help="class names in the model's order (required when SOURCE names none)")
@click.option("--input-range", default="0-1", show_default=True, metavar="0-1|0-255",
              help="values the source model saw for the scenes' pixels (torchvision, DeepForest: 0-1)")
@click.option("--pixel-max", default=255.0, show_default=True, type=float,
              help="scene pixel value the source saw as the top of --input-range (255 for 8-bit)")
@click.option("--no-resize", is_flag=True, help="run chips at native size instead of the source's resize rule")
@click.option("--offline", is_flag=True, help="named sources: read only the library's cache, never download")
def import_model(source: str, out: str, kind: str, classes: str | None, input_range: str, pixel_max: float,
                 no_resize: bool, offline: bool) -> None:
    """Import a torchvision or DeepForest RetinaNet so that it predicts as at home.

    SOURCE is a file, or a name downloaded through its owner's library into its cache:
    torchvision:retinanet_resnet50_fpn, torchvision:retinanet_resnet50_fpn_v2 (COCO),
    hf:weecology/deepforest-tree (or another DeepForest release, hf:OWNER/REPO[@REVISION]).
    """
    from pipeline.io.model_card import write_model_card
    from retinanet.checkpoint import CheckpointError, save_checkpoint
    from retinanet.hub import import_named, is_named_source
    from retinanet.imports import import_model as read_model

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    overrides = {"min_size": None, "max_size": None} if no_resize else {}
    try:
        if is_named_source(source):
            imported = import_named(source, names, input_range, pixel_max, offline, **overrides)
        else:
            imported = read_model(source, kind, names, input_range, pixel_max, **overrides)
        path = save_checkpoint(out, imported.model, imported.class_names, imported.metadata)
        card = write_model_card(path)  # the STAC MLM model card beside it
    except (CheckpointError, ValueError) as err:
        fail(ConfigError(str(err)))
    info, cfg = imported.metadata["imported_from"], imported.model.config
    resize = f"min_size {cfg.min_size}, max_size {cfg.max_size}" if cfg.min_size else "none (native chips)"
    click.echo(f"{path}: {info['architecture']} from a {info['kind']} {info['form']}; "
               f"classes {', '.join(imported.class_names)}")
    mean, std = [round(v, 3) for v in cfg.image_mean], [round(v, 3) for v in cfg.image_std]
    click.echo(f"input: source saw {info['input_range']} for pixels 0-{pixel_max:g}; image_mean {mean}, "
               f"image_std {std} (pixel units)")
    click.echo(f"inference: resize {resize}; score > {cfg.score_threshold}, NMS IoU {cfg.nms_threshold}, "
               f"{cfg.detections_per_image} detections per chip (job fields override them)")
    click.echo(f"model card: {card}")


@main.command(name="export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="output file [default: CHECKPOINT.onnx, which model.backend: onnx picks up]")
def export(checkpoint: str, fmt: str, out: str | None) -> None:
    """Export a checkpoint's network (dynamic batch and chip size) for other runtimes."""
    from retinanet.checkpoint import CheckpointError
    from retinanet.export import OnnxUnavailableError, export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out)
    except (CheckpointError, OnnxUnavailableError) as err:
        fail(err)
    click.echo(f"{path}: {fmt} ({path.stat().st_size / 2**20:.1f} MiB)")


@main.command()
@click.option("--markdown", is_flag=True, help="the field reference (docs/job-reference.md) instead of JSON")
def schema(markdown: bool) -> None:
    """Print the job file's JSON Schema (from the job model), e.g. for an editor or a linter."""
    from pipeline.config.reference import job_reference_markdown, job_schema

    click.echo(job_reference_markdown() if markdown else json.dumps(job_schema(), indent=2), nl=not markdown)


@main.group(name="ray")
def ray_head() -> None:
    """A long-lived local Ray head that runs with compute.address null join (start-up without
    starting Ray): up, status, down. Only the head started by `up` is stopped; never `ray stop`."""


@ray_head.command(name="up")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the head [default: the machine's]")
@click.option("--num-gpus", type=int, default=None, help="GPUs of the head [default: the machine's]")
def ray_up(num_cpus: int | None, num_gpus: int | None) -> None:
    """Start the local head (ray start --head --block, in a session of its own)."""
    from pipeline.compute.cluster import head_file, start_head

    try:
        head = start_head(num_cpus, num_gpus)
    except PipelineError as err:
        fail(err)
    click.echo(f"local Ray head up at {head['address']} (pid {head['pid']}; recorded in {head_file()}); "
               "runs with compute.address null join it until `pipeline ray down`")


@ray_head.command(name="status")
def ray_status() -> None:
    """Say whether the local head lives, and where (exit 1 when none is up)."""
    from pipeline.compute.cluster import live_head

    head = live_head()
    if head is None:
        click.echo("no local Ray head is up (pipeline ray up starts one)")
        sys.exit(EXIT_INCOMPLETE)
    click.echo(json.dumps(head, indent=2))


@ray_head.command(name="down")
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait before killing what is left")
def ray_down(timeout: float) -> None:
    """Stop the local head that `pipeline ray up` started (no other Ray process is touched)."""
    from pipeline.compute.cluster import stop_head

    head = stop_head(timeout)
    click.echo("no local Ray head was recorded" if head is None
               else f"local Ray head at {head['address']} (pid {head['pid']}) stopped")


if __name__ == "__main__":
    main()
