"""Shared pytest fixtures.

``ray_session``: one local Ray instance (2 CPUs, 2 units of the custom resource ``cpu_node``, no dashboard) for the
whole test session; tests that need Ray take it as an argument. Start-up costs several seconds, so it is created
once and shut down at the end.
"""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # Ray Data's DataContext.copy() re-sets deprecated fields and warns about them on every dataset: not ours.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = False
    if not ray.is_initialized():
        # cpu_node: the custom resource of the CPU-only node types in clusters/ (placement tests)
        ray.init(num_cpus=2, resources={"cpu_node": 2}, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    if started:
        ray.shutdown()
