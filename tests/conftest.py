"""Shared pytest fixtures."""

import os
import tempfile

import pytest

# Prefect reads its settings on import: point it at a throw-away home before any test imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The test server only runs flows directly: no telemetry heartbeat (it raced the server's start-up
# for the SQLite lock) and no background services taking the 2 cores from the timing-sensitive tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
for _service in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "REPOSSESSOR",
                 "DB_VACUUM"):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{_service}_ENABLED", "false")
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "10")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Small networks on 2 cores: one intra-op thread (see loop.runtime)."""
    from loop.runtime import configure_torch_threads

    configure_torch_threads()


@pytest.fixture(autouse=True)
def _no_campaign_environment(monkeypatch):
    """Tests choose their campaign, store and Ray cluster explicitly, whatever the shell exports."""
    for name in ("LOOP_DB_URL", "LOOP_CAMPAIGN", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _reproducible_campaign_ids():
    """Campaign ids drawn from a seeded sequence instead of uuid4: an id's first characters go into
    the plate barcodes, which seed the synthetic lab's noise, so every run measures the same
    plates (a statistical assertion that fails, fails every time). Set ``LOOP_TEST_ID_SEED`` to
    draw another sequence."""
    import random

    import loop.campaign

    rng = random.Random(int(os.environ.get("LOOP_TEST_ID_SEED", "0")))
    real = loop.campaign.new_campaign_id
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.campaign, "new_campaign_id",
                   lambda seed=None: real(rng.getrandbits(62) if seed is None else seed))
        yield


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
