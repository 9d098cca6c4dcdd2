"""`pipeline submit`: run a job on a Ray cluster as a Ray Job (JobSubmissionClient).

What travels: the job file, *resolved* on the submitting machine, in a temporary
``working_dir`` that Ray uploads to the cluster; the entrypoint is
``pipeline run job.yaml`` in that directory. Resolution before upload means:

- relative paths are made absolute against the job file's directory (``--set`` values
  against the current directory), exactly as ``pipeline run`` would, so the uploaded
  file does not depend on where it lands;
- ``--set`` overrides are applied and the job is validated locally, so a typo fails
  here, not on the cluster an hour later;
- ``compute.address: null`` becomes ``"auto"``: inside a Ray Job the driver must join
  the cluster it runs on (and wait for the autoscaler to add GPU nodes) instead of
  treating the head as a local single-node Ray.

Paths are not rewritten otherwise: absolute *local* paths must exist on the cluster
(the cluster launcher's ``file_mounts``, a shared file system) or be URLs
(``s3://``, ``https://``). :func:`local_paths` lists them so the CLI can say so.
The cluster must have this package installed (see ``ray_cluster.yaml``): the job's
code is not shipped, only its configuration.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import yaml

from pipeline.config.locations import is_remote
from pipeline.config.spec import apply_overrides, parse_job, read_job_file, resolve_paths
from pipeline.errors import ConfigError, PipelineError
from pipeline.io.inputs import expand_patterns, id_collisions

JOB_FILE = "job.yaml"
# Where Ray's job CLI finds the cluster when no address is given, in this order
# (ray.dashboard.utils.get_address_for_submission_client).
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(PipelineError):
    """The cluster could not be reached, or refused the job."""


def resolved_job_data(job_path: str | Path, overrides: Sequence[str] = (),
                      cwd: Optional[str | Path] = None) -> dict:
    """The job as it will run on the cluster: paths absolute, overrides applied, validated,
    ``compute.address`` null -> ``"auto"``. Raises ConfigError naming the field."""
    source = str(job_path)
    data = read_job_file(job_path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job must be a YAML mapping of sections, got {type(data).__name__}")
    data = resolve_paths(data, Path(job_path).resolve().parent)
    data = apply_overrides(data, overrides, cwd=cwd)
    compute = data.get("compute")
    if compute is None or (isinstance(compute, dict) and compute.get("address") is None):
        data["compute"] = {**(compute or {}), "address": "auto"}
    spec = parse_job(data, source=source)  # validate only; the dict is what gets uploaded
    if spec.inputs.paths:  # the one expander: two inputs with one scene id fail here, not on the cluster
        collisions = id_collisions(expand_patterns(spec.inputs.paths).scenes)
        if collisions:
            raise ConfigError("\n".join(f"{source}: inputs.paths: {c}" for c in collisions))
    return data


def local_paths(data: dict) -> list[str]:
    """Local (non-URL) paths the job refers to: they must exist on the cluster nodes."""
    found: list[str] = []
    inputs = data.get("inputs") or {}
    found += [p for p in inputs.get("paths") or [] if isinstance(p, str)]
    stac = inputs.get("stac")
    if isinstance(stac, dict) and isinstance(stac.get("source"), str):
        found.append(stac["source"])
    for section, key in (("model", "checkpoint"), ("output", "table")):
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str):
            found.append(value)
    return [p for p in found if not is_remote(p)]


def entrypoint(run_id: Optional[str] = None, force: bool = False) -> str:
    """The shell command the cluster runs, in the uploaded working_dir."""
    parts = ["pipeline", "run", JOB_FILE]
    if run_id:
        parts += ["--run-id", run_id]
    if force:
        parts.append("--force")
    return " ".join(shlex.quote(p) for p in parts)


def dashboard_address(address: str) -> str:
    """``HOST:PORT`` -> ``http://HOST:PORT``; URLs with a scheme are kept as given."""
    address = address.strip()
    if not address:
        raise ConfigError("--address: empty; expected the Ray dashboard, e.g. http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


@contextlib.contextmanager
def _without(names: Sequence[str]) -> Iterator[None]:
    """The environment without ``names`` for the block (restored after)."""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: Optional[str]):
    """A JobSubmissionClient for the dashboard at ``address``; SubmitError if unreachable.

    ``address`` None: the cluster Ray's job CLI would use, from $RAY_API_SERVER_ADDRESS, else
    $RAY_ADDRESS (a dashboard URL, or a cluster address Ray looks the dashboard up for); a
    ConfigError when neither is set. An address given wins over both (Ray's client would let
    them replace it)."""
    from ray.job_submission import JobSubmissionClient

    hide: Sequence[str] = ()
    if address is None:
        named = next(((k, os.environ[k]) for k in ADDRESS_ENV if os.environ.get(k, "").strip()), None)
        if named is None:
            raise ConfigError("no cluster to submit to: give --address http://HEAD:8265, or set RAY_ADDRESS "
                              "(as for `ray job submit`)")
        where, url = f"{named[1]} (${named[0]})", None
    else:
        url = dashboard_address(address)
        where, hide = url, ADDRESS_ENV
    try:
        with _without(hide):
            return JobSubmissionClient(url)
    except Exception as err:  # ConnectionError, HTTP errors, version mismatch: all say "cannot submit"
        raise SubmitError(f"{where}: cannot reach the Ray job server ({type(err).__name__}: {err})") from None


def submit_job(address: Optional[str], job_path: str | Path, overrides: Sequence[str] = (),
               run_id: Optional[str] = None, force: bool = False,
               submission_id: Optional[str] = None) -> tuple[str, list[str]]:
    """Submit ``job_path`` as a Ray Job; return (submission id, local paths the cluster needs).

    The resolved job file is written to a temporary directory used as the job's
    ``working_dir`` (Ray uploads it before this returns; the directory is removed).
    """
    data = resolved_job_data(job_path, overrides)
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="pipeline-submit-") as tmp:
        (Path(tmp) / JOB_FILE).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(run_id, force),
                runtime_env={"working_dir": tmp},
                submission_id=submission_id,
                metadata={"job_name": str(data.get("name")), "job_file": str(Path(job_path).resolve())},
            )
        except Exception as err:
            raise SubmitError(f"{client.get_address()}: job {job_path} was refused: {err}") from None
    return job_id, local_paths(data)


async def _tail(client, job_id: str, write: Callable[[str], object]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def exit_code_of(status: str, driver_exit_code: Optional[int]) -> int:
    """The exit status ``pipeline submit --follow`` returns for a finished job: the
    driver's own exit code when Ray reports it, else 0 for SUCCEEDED and 1 otherwise."""
    if driver_exit_code is not None:
        return int(driver_exit_code)
    return 0 if status == "SUCCEEDED" else 1


def follow_job(address: Optional[str], job_id: str, write: Callable[[str], object] = sys.stdout.write,
               poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; return its exit code (:func:`exit_code_of`)."""
    client = connect(address)
    try:
        asyncio.run(_tail(client, job_id, write))
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can close just before the status flips
            time.sleep(poll_s)
            status = client.get_job_status(job_id)
        info = client.get_job_info(job_id)
    except PipelineError:
        raise
    except Exception as err:
        raise SubmitError(f"{client.get_address()}: lost track of job {job_id}: {err}") from None
    if info.message and str(info.status) != "SUCCEEDED":
        write(f"\njob {job_id} {info.status}: {info.message}\n")
    return exit_code_of(str(info.status.value if hasattr(info.status, "value") else info.status),
                        getattr(info, "driver_exit_code", None))
