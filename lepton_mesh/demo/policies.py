"""The policy files the demo applies, and the change it makes to them.

The demo applies the repository's own `examples/mesh/` as they are (a 90/10
canary of dialog v1/v2, retries, circuit breakers), then a copy of dialog's
Route with other weights, the way a team would edit the file in its repo.

Contract with `examples/mesh/dialog.yaml`: the Route for `dialog` has a rule
named `turns` (CANARY_RULE) that splits `POST /v1/turn`, chat's call, over the
subsets `v1` and `v2`. Its weights are what the demo reports the split
against; a file without that rule is refused with a message naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

import lepton_mesh
from lepton_mesh.demo.errors import MissingExamples
from lepton_mesh.demo.observe import route_rule_weights

DESTINATION = "dialog"
CANARY_RULE = "turns"
# The Route stamps the split on the calls it splits; kept in step with the weights.
SPLIT_HEADER = "x-canary-split"


def examples_dir() -> Path:
    """`examples/mesh/` of the source tree this package runs from."""
    path = Path(lepton_mesh.__file__).resolve().parent.parent / "examples" / "mesh"
    if not path.is_dir():
        raise MissingExamples(
            f"{path} not found: the demo applies the policy files of a source checkout "
            "(run it from the repository, e.g. `make demo`)"
        )
    return path


def load_manifests(paths: list[Path]) -> list[Any]:
    docs: list[Any] = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def canary_weights(manifests: list[Any], where: str) -> dict[str, int]:
    """subset -> weight of dialog's canary rule; MissingExamples when it is absent."""
    weights = route_rule_weights(manifests, DESTINATION, CANARY_RULE)
    if not weights:
        raise MissingExamples(
            f"{where}: no Route for {DESTINATION!r} with a rule named {CANARY_RULE!r}; the demo "
            "splits its traffic with that rule (see lepton_mesh/demo/policies.py)"
        )
    return weights


def with_weights(route: dict[str, Any], weights: dict[str, int]) -> dict[str, Any]:
    """A copy of dialog's Route whose canary rule has `weights` (subset -> weight)."""
    new = copy.deepcopy(route)
    for rule in new["spec"]["rules"]:
        if rule.get("name") != CANARY_RULE:
            continue
        rule["backends"] = [{**b, "weight": weights[b["subset"]]} for b in rule["backends"]]
        headers = (rule.get("request_headers") or {}).get("set") or {}
        if SPLIT_HEADER in headers:
            headers[SPLIT_HEADER] = fmt_weights(weights)
    return new


def write_change(examples: Path, weights: dict[str, int], out: Path) -> Path:
    """Write dialog's Route from `examples`, with `weights`, to `out` (one document)."""
    docs = load_manifests(sorted(examples.glob("*.yaml")))
    route = next(
        (
            d
            for d in docs
            if d.get("kind") == "Route" and d["spec"].get("destination") == DESTINATION
        ),
        None,
    )
    if route is None:
        raise MissingExamples(f"{examples}: no Route for {DESTINATION!r}")
    header = (
        f"# dialog's Route from {examples.name}/, with the canary at "
        f"{fmt_weights(weights)} (v1/v2).\n"
    )
    out.write_text(header + yaml.safe_dump(with_weights(route, weights), sort_keys=False))
    return out


def fmt_weights(weights: dict[str, int]) -> str:
    """`90/10`: the weights in subset order (v1 first)."""
    return "/".join(str(weights[k]) for k in sorted(weights))
