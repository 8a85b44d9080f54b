"""Fixtures for the deploy/observability checks: what the code really exports, scraped
once per run from a real mesh and a real control daemon (obsdeploy_mesh), and the
deploy/observability files' target labels."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from obsdeploy_files import SCRAPE_CONFIGS, load_yaml, scrape_target_labels
from obsdeploy_mesh import scrape_control, scrape_sidecars
from obsdeploy_promql import Exported, exported_from_text, merge

from lepton_mesh.control.etcd_local import LocalEtcd
from tests.support.etcd import etcd_private, eventually  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def scrapes() -> dict[str, str]:
    """The text of /metrics of web's and ratings' sidecars and of a control daemon."""
    server = LocalEtcd(fast=True).start()  # the daemon uses the fixed /lepton/v1/ layout
    try:
        with tempfile.TemporaryDirectory() as tmp:
            web, ratings = asyncio.run(scrape_sidecars(Path(tmp)))
        control = asyncio.run(scrape_control(list(server.endpoints)))
    finally:
        server.close()
    return {"web": web, "ratings": ratings, "control": control}


@pytest.fixture(scope="session")
def exported(scrapes: dict[str, str]) -> Exported:
    return merge(*(exported_from_text(text) for text in scrapes.values()))


@pytest.fixture(scope="session")
def target_labels() -> frozenset[str]:
    """The target labels every series has under every scrape config (job, instance):
    the only ones rules and panels may use besides the metrics' own."""
    per_job = [
        labels
        for path in SCRAPE_CONFIGS
        for labels in scrape_target_labels(load_yaml(path)).values()
    ]
    return frozenset.intersection(*per_job)
