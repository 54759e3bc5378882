"""Shared pytest fixtures.

``ray_session``: one local Ray instance (2 CPUs, 2 units of the custom resource ``cpu_node``, no dashboard) for the
whole test session; tests that need Ray take it as an argument. Start-up costs several seconds, so it is created
once and shut down at the end.

Object storage: ``tests/test_object_storage.py`` serves S3 (moto's server) on ``127.0.0.1:$RAYDET_TEST_S3_PORT`` and
GCS (gcp-storage-emulator, ``STORAGE_EMULATOR_HOST``) on ``127.0.0.1:$RAYDET_TEST_GCS_PORT``.
Ray's workers inherit the environment of the process that starts Ray, and the one Ray instance may start before that
module runs, so the session sets the endpoint and fake credentials first: no test reaches a cloud, and every Ray
worker and actor reads the test server.
"""
from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT_ENV = "RAYDET_TEST_S3_PORT"
GCS_PORT_ENV = "RAYDET_TEST_GCS_PORT"


def pytest_configure(config):
    # Ray Data's DataContext.copy() re-sets deprecated fields and warns about them on every dataset: not ours.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.data.context")
    # the test S3 server's endpoint and fake credentials, before anything starts Ray (see the module docstring)
    port = os.environ.setdefault(S3_PORT_ENV, str(_free_port()))
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "raydet-test",
                       "AWS_SECRET_ACCESS_KEY": "raydet-test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    gcs_port = os.environ.setdefault(GCS_PORT_ENV, str(_free_port()))
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{gcs_port}"


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = False
    if not ray.is_initialized():
        # cpu_node: the custom resource of the CPU-only node types in clusters/ (placement tests).
        # dashboard_port: with no dashboard Ray still publishes <host>:<dashboard_port> (8265 unless given) as its
        # State API address, and Ray Train's PlacementGroupCleaner asks it whether a run's controller is alive; a
        # dashboard of another Ray instance there answers "no such actor" and the run's workers are removed
        # mid-run. A free port of our own cannot answer for another instance.
        ray.init(num_cpus=2, resources={"cpu_node": 2}, include_dashboard=False, dashboard_port=_free_port(),
                 log_to_driver=False, configure_logging=False)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def worker_hooks(ray_session, monkeypatch) -> str:
    """The module name under which Ray's workers import ``tests/_worker_hooks.py`` (test hooks loaded through
    ``runtime.imports``), made importable in this process too.

    Ray puts the directory the session started Ray from on its workers' path (not pytest's ``tests/`` entry): the
    module is ``tests._worker_hooks`` from the repository root, ``_worker_hooks`` from ``tests/``."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = ["tests._worker_hooks", "_worker_hooks"]

    @ray_session.remote(num_cpus=0)
    def importable(candidates):
        import importlib

        for name in candidates:
            try:
                importlib.import_module(name)
                return name
            except ImportError:
                continue
        return None

    name = ray_session.get(importable.remote(names), timeout=300)
    if name is None:
        pytest.fail(f"Ray's workers can import neither of {names}: start pytest from the repository root")
    monkeypatch.syspath_prepend(str(root if name.startswith("tests.") else root / "tests"))
    return name
