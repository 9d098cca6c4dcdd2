"""Shared fixtures: one local Ray per test session (opt-in: ``ray_session``), with logical GPUs for pinning tests."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from moto_server import free_port, start_moto, stop

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Converted models and fetched checkpoints go to a cache of this session's own (set before
# Ray starts, so its workers inherit it), removed at the end: a full run writes ~1.1 GB.
_SESSION_CACHE = None if "RETINANET_PIPELINE_CACHE" in os.environ else tempfile.mkdtemp(prefix="pipeline-test-cache-")
if _SESSION_CACHE:
    os.environ["RETINANET_PIPELINE_CACHE"] = _SESSION_CACHE


def _ray_with_gpus():
    """This process's Ray with 2 CPUs and 2 logical GPUs (for the pinning tests), started if
    none is up and restarted if the one up has no GPUs (a ``pipeline run`` starts a Ray of its
    own without GPUs when none is up; a test that joined another cluster may leave one)."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < 2:
        ray.shutdown()
    if not ray.is_initialized():
        # "local": a Ray of this session's own, also when a head started with `ray start` or
        # `pipeline ray up` runs on this machine (ray.init would join it otherwise).
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and 2 logical GPUs, started once and shut down at the end.

    Opt-in: a test that needs Ray (``pipeline run`` in-process, Ray Data, Ray Train, actors)
    takes this fixture as an argument, or its module says
    ``pytestmark = pytest.mark.usefixtures("ray_session")``; such tests are marked ``ray``
    (see pytest_collection_modifyitems), so ``pytest -m "not ray"`` runs without a cluster.
    Only this process's Ray is stopped (ray.shutdown); other Ray instances are untouched.
    """
    ray = _ray_with_gpus()
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Every test that uses ``ray_session`` (itself or through a fixture) is marked ``ray``.
    Tests that start Ray only in child processes carry ``pytest.mark.ray`` themselves."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here: most tests do without it
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _ray_only_on_request(request):
    """A test that did not request ``ray_session`` but started Ray in this process fails:
    it would pass in a full run on the session's Ray and start one of its own (without GPUs,
    a cluster's start-up time) under ``-m "not ray"``. Its Ray is shut down, so later tests
    do not run on it. Around a test that did request it, a Ray stopped or replaced (a test
    that joins a cluster of its own) is brought back."""
    if "ray_session" in request.fixturenames:
        _ray_with_gpus()
        yield
        _ray_with_gpus()
        return
    was_up = _ray_up()
    yield
    if "ray_session" in request.fixturenames:  # asked for while running (request.getfixturevalue)
        _ray_with_gpus()
        return
    if not was_up and _ray_up():
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray in the test process without requesting the ray_session fixture: "
                    "add ray_session to its arguments (or pytestmark = pytest.mark.usefixtures(\"ray_session\") "
                    "to its module) so it runs on the session's Ray and is marked ray", pytrace=False)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``tmp_path_factory.mktemp`` for the files a test module shares (scenes, checkpoints,
    trained runs), removed when the module's tests are done unless one of them failed.
    tmp_path_factory alone keeps them until the session ends: 3.9 GB by then, which a CI
    machine with a full disk does not have beside the environment (a CI run died of it)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_unconfigure(config):
    """The session's cache goes at the very end, also when no test ran (Ray is down by then)."""
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# Object storage: a local S3-compatible server (moto's server mode) on 127.0.0.1. The
# endpoint is fixed when this file is imported, before Ray starts, so Ray's worker
# processes inherit it (GDAL's /vsis3/ reads and obstore both read AWS_ENDPOINT_URL).
S3_PORT = free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
})


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for this test session; yields a boto3 client for setup.

    Only the process started here is stopped at the end.
    """
    import boto3

    try:
        proc = start_moto(S3_PORT)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    stop(proc)
