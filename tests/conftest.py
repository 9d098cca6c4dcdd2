"""Shared fixtures: one local Ray per test session, with logical GPUs for pinning tests."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and 2 logical GPUs, started once and shut down at the end.

    Only this process's Ray is stopped (ray.shutdown); other Ray instances are untouched.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
