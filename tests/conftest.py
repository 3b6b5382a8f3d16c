"""Shared pytest fixtures."""

import os
import tempfile

import pytest

# Prefect reads its settings on import: point it at a throw-away home before any test imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Small networks on 2 cores: one intra-op thread (see loop.runtime)."""
    from loop.runtime import configure_torch_threads

    configure_torch_threads()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (started on first use, ~10 s), shut down at the end."""
    from models import ray_executor

    ray = ray_executor.ensure_ray(num_cpus=2)
    yield ray
    ray_executor.shutdown_ray()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the few tests that run flows for real (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
