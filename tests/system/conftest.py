"""The system tests' fixtures: one whole mesh of real processes per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.system_support import FIGURES, LEASE_TTL, Mesh


@pytest.fixture(scope="module")
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """Started once per module (a few seconds); every test gets it settled.

    A module may set `MESH_LEASE_TTL` (seconds) for its control replicas."""
    ttl = getattr(request.module, "MESH_LEASE_TTL", LEASE_TTL)
    built = Mesh(Path(tmp_path_factory.mktemp("mesh")), lease_ttl=ttl)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def settled(mesh: Mesh) -> Mesh:
    """The mesh back in its starting state, whatever the previous test did to it."""
    mesh.settle()
    return mesh


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("system tests: measured")
        for label, value in FIGURES.items():
            terminalreporter.write_line(f"{label}: {value}")
