"""deploy/observability/prometheus.yml (Kubernetes) and prometheus-static.yml (file_sd):
the jobs, where they point, and promtool's own check where promtool can read them."""

from __future__ import annotations

import pytest
import yaml
from obsdeploy_files import (
    JOBS,
    OBSERVABILITY,
    SCRAPE_CONFIGS,
    load_yaml,
    promtool,
    run_promtool,
)

from lepton_mesh.control.daemon import ControlOptions
from lepton_mesh.policy.sidecar_config import Listeners

KUBERNETES, STATIC = (load_yaml(p) for p in SCRAPE_CONFIGS)
# The container port names the Kubernetes config keeps (the contract with deploy/kubernetes/).
PORT_NAMES = {"lepton-sidecars": "lepton-admin", "lepton-control": "control-admin"}


def _jobs(config: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


@pytest.mark.parametrize("config", [KUBERNETES, STATIC], ids=["kubernetes", "static"])
def test_both_jobs_scrape_metrics_and_load_the_rules(config: dict) -> None:
    assert config["rule_files"] == ["alerts.yml"]
    jobs = _jobs(config)
    assert set(jobs) == set(JOBS)
    for job in jobs.values():
        # The path the scenario in conftest scraped, on sidecars and on the control daemon.
        assert job["metrics_path"] == "/metrics"


def test_kubernetes_jobs_keep_their_named_port_and_drop_finished_pods() -> None:
    for name, job in _jobs(KUBERNETES).items():
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
        keep, drop = job["relabel_configs"][:2]
        assert keep == {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": PORT_NAMES[name],
            "action": "keep",
        }
        assert drop["source_labels"] == ["__meta_kubernetes_pod_phase"]
        assert drop["action"] == "drop" and "Succeeded" in drop["regex"]
        # Port names are IANA service names: at most 15 characters.
        assert len(PORT_NAMES[name]) <= 15


def test_static_targets_are_the_default_admin_ports() -> None:
    files = {name: job["file_sd_configs"][0]["files"][0] for name, job in _jobs(STATIC).items()}
    sidecar_admin = Listeners().admin
    control_admin = ControlOptions(etcd=("x",)).admin
    assert control_admin is not None
    expected = {
        "lepton-sidecars": f"{sidecar_admin.host}:{sidecar_admin.port}",
        "lepton-control": f"{control_admin[0]}:{control_admin[1]}",
    }
    for name, path in files.items():
        (group,) = load_yaml(OBSERVABILITY / path)
        assert group["targets"] == [expected[name]], path


@pytest.mark.skipif(promtool() is None, reason="promtool is not on PATH (it is not on PyPI)")
@pytest.mark.parametrize("path", SCRAPE_CONFIGS, ids=lambda p: p.name)
def test_promtool_checks_the_config(path) -> None:
    result = run_promtool("check", "config", path.name)
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert result.returncode == 0, output


def _pod_ports(manifest: dict) -> list[dict]:
    """Every container port of a workload manifest's pod template, init containers too."""
    spec = manifest.get("spec", {}).get("template", {}).get("spec", {})
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    return [port for c in containers for port in c.get("ports", [])]


def test_the_kubernetes_manifests_name_the_ports_prometheus_keeps() -> None:
    """deploy/kubernetes/ and prometheus.yml agree on the port names (and numbers)."""
    ports: dict[str, set[int]] = {}
    for path in sorted((OBSERVABILITY.parent / "kubernetes").rglob("*.yaml")):
        for manifest in yaml.safe_load_all(path.read_text()):
            for port in _pod_ports(manifest or {}):
                ports.setdefault(port.get("name", ""), set()).add(port["containerPort"])
    control_admin = ControlOptions(etcd=("x",)).admin
    assert control_admin is not None
    assert ports.get(PORT_NAMES["lepton-sidecars"]) == {Listeners().admin.port}
    assert ports.get(PORT_NAMES["lepton-control"]) == {control_admin[1]}
