"""The deploy/observability files, loaded, and what the checks read out of them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
ALERTS_TEST = OBSERVABILITY / "alerts_test.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
SCRAPE_CONFIGS = (OBSERVABILITY / "prometheus.yml", OBSERVABILITY / "prometheus-static.yml")
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

# The scrape jobs every config must have, and what they scrape.
JOBS = ("lepton-sidecars", "lepton-control")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(board: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every panel, rows' panels included."""
    out = []
    for panel in _panels(board["panels"]):
        out += [(panel.get("title", ""), t) for t in panel.get("targets", [])]
    return out


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))
    return out


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return _panels(board["panels"])


# Grafana's variables, as a query would see them after interpolation.
_GRAFANA_VARS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "service": "ratings",
}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def interpolate(expr: str) -> str:
    """`expr` with Grafana's variables replaced as Grafana would (KeyError: unknown one)."""
    return _VAR.sub(lambda m: _GRAFANA_VARS[m[1] or m[2]], expr)


def scrape_target_labels(config: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Per job: the labels Prometheus attaches to every series it scrapes there."""
    out = {}
    for job in config["scrape_configs"]:
        labels = {"job", "instance"}
        for rc in job.get("relabel_configs", []):
            target = rc.get("target_label")
            if target and rc.get("action", "replace") == "replace" and not target.startswith("__"):
                labels.add(target)
        out[job["job_name"]] = frozenset(labels)
    return out


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def doc_anchors(path: Path) -> set[str]:
    return {github_anchor(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", path.read_text(), re.M)}


def promtool() -> str | None:
    return shutil.which("promtool")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    assert tool is not None
    return subprocess.run(
        [tool, *args], cwd=OBSERVABILITY, capture_output=True, text=True, timeout=60, check=False
    )
