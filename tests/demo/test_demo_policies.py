"""The policy files the demo applies: examples/mesh/ as they are, and the 50/50 change."""

import subprocess
import sys

import pytest
import yaml

from lepton_mesh.demo.errors import MissingExamples
from lepton_mesh.demo.observe import healthy_endpoints, route_rule_weights
from lepton_mesh.demo.policies import (
    canary_weights,
    examples_dir,
    fmt_weights,
    load_manifests,
    with_weights,
    write_change,
)

ROUTE = {
    "apiVersion": "lepton-mesh/v1",
    "kind": "Route",
    "metadata": {"name": "dialog", "namespace": "default"},
    "spec": {
        "destination": "dialog",
        "rules": [
            {"name": "beta", "backends": [{"service": "dialog", "subset": "v2"}]},
            {
                "name": "turns",
                "backends": [
                    {"service": "dialog", "subset": "v1", "weight": 90},
                    {"service": "dialog", "subset": "v2", "weight": 10},
                ],
                "request_headers": {"set": {"x-canary-split": "90/10", "x-other": "1"}},
            },
        ],
    },
}


def test_the_examples_are_a_90_10_canary() -> None:
    examples = examples_dir()
    manifests = load_manifests(sorted(examples.glob("*.yaml")))
    assert canary_weights(manifests, str(examples)) == {"v1": 90, "v2": 10}


def test_with_weights_changes_the_canary_rule_and_its_header_only() -> None:
    new = with_weights(ROUTE, {"v1": 50, "v2": 50})
    rules = new["spec"]["rules"]
    assert rules[0] == ROUTE["spec"]["rules"][0]
    assert [b["weight"] for b in rules[1]["backends"]] == [50, 50]
    assert rules[1]["request_headers"]["set"] == {"x-canary-split": "50/50", "x-other": "1"}
    assert ROUTE["spec"]["rules"][1]["backends"][0]["weight"] == 90  # the input is untouched


def test_the_change_file_is_dialogs_route_alone_and_valid(tmp_path) -> None:
    path = write_change(examples_dir(), {"v1": 50, "v2": 50}, tmp_path / "dialog-50-50.yaml")
    docs = load_manifests([path])
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Route", "dialog")]
    assert route_rule_weights(docs, "dialog", "turns") == {"v1": 50, "v2": 50}
    # Valid together with the rest of the set, as the server will check it on apply.
    others = [p for p in sorted(examples_dir().glob("*.yaml")) if p.name != "dialog.yaml"]
    policy = tmp_path / "policy.yaml"
    dialog_policy = [d for d in load_manifests([examples_dir() / "dialog.yaml"])
                     if d["kind"] == "DestinationPolicy"]  # fmt: skip
    policy.write_text(yaml.safe_dump_all(dialog_policy, sort_keys=False))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton_mesh",
            "validate",
            str(path),
            str(policy),
            *map(str, others),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_files_without_the_canary_rule_are_refused_by_name() -> None:
    route = with_weights(ROUTE, {"v1": 90, "v2": 10})
    route["spec"]["rules"][1]["name"] = "split"
    with pytest.raises(
        MissingExamples, match=r"mesh/: no Route for 'dialog' with a rule named 'turns'"
    ):
        canary_weights([route], "mesh/")


WEIGHT_CASES = [
    # (manifests, destination, rule, expected)
    ([ROUTE], "dialog", "turns", {"v1": 90, "v2": 10}),
    ([ROUTE], "dialog", "beta", {"v2": 1}),
    ([ROUTE], "intent", "turns", None),
    ([{**ROUTE, "kind": "DestinationPolicy"}], "dialog", "turns", None),
    ([None, "text", ROUTE], "dialog", "turns", {"v1": 90, "v2": 10}),
    (None, "dialog", "turns", None),
]


@pytest.mark.parametrize(("manifests", "destination", "rule", "expected"), WEIGHT_CASES)
def test_route_rule_weights(manifests, destination, rule, expected) -> None:
    assert route_rule_weights(manifests, destination, rule) == expected


def test_healthy_endpoints_from_a_running_config() -> None:
    config = {
        "services": {
            "dialog": {
                "endpoints": [
                    {"address": "127.0.0.1:1", "labels": {"version": "v2"}, "healthy": True},
                    {"address": "127.0.0.1:2", "labels": {"version": "v1"}, "healthy": True},
                    {"address": "127.0.0.1:3", "labels": {"version": "v3"}, "healthy": False},
                ]
            },
            "intent": {"endpoints": [{"address": "127.0.0.1:4", "labels": {}}]},
        }
    }
    assert healthy_endpoints(config) == {"dialog": ["v1", "v2"], "intent": ["?"]}
    assert healthy_endpoints({"services": None}) == {}


def test_fmt_weights_orders_by_subset() -> None:
    assert fmt_weights({"v2": 10, "v1": 90}) == "90/10"
