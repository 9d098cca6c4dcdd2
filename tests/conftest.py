"""Shared fixtures: one local Ray per test session, with logical GPUs for pinning tests."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from moto_server import free_port, start_moto, stop

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Converted models and fetched checkpoints go to a cache of this session's own (set before
# Ray starts, so its workers inherit it), removed at the end: each session writes ~600 MB.
_SESSION_CACHE = None if "RETINANET_PIPELINE_CACHE" in os.environ else tempfile.mkdtemp(prefix="pipeline-test-cache-")
if _SESSION_CACHE:
    os.environ["RETINANET_PIPELINE_CACHE"] = _SESSION_CACHE


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """A local Ray with 2 CPUs and 2 logical GPUs, started once and shut down at the end.

    Started before the first test, whatever it is: `pipeline run` starts a Ray of its own
    (without GPUs) when none is up, and a test that ran it first would leave every later
    test on that Ray. Only this process's Ray is stopped (ray.shutdown); other Ray
    instances are untouched.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
