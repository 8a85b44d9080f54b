"""The sidecar config keys for a sidecar fed by control: dependencies, instance,
control, health_check. The YAML contract, every rule, the JSON view."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.sidecar_config import (
    Address,
    ControlConfig,
    HealthCheckConfig,
    InstanceConfig,
    SidecarConfig,
)
from lepton_mesh.policy.sidecar_loader import (
    load_sidecar_config,
    sidecar_config_from_mapping,
    sidecar_config_to_json,
)

FULL = """\
service: chat
app: 127.0.0.1:8080
dependencies: [intent, dialog]
instance: {id: chat-1, address: 10.0.0.5, labels: {version: v1, zone: a}, weight: 2}
control: {addresses: [127.0.0.1:15010, "[::1]:15010"], state_dir: state/chat}
health_check: {path: /healthz, interval: 2s, timeout: 500ms}
"""


def test_every_key_loads_into_the_model(tmp_path: Path) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text(FULL)
    cfg = load_sidecar_config(path)
    assert cfg == SidecarConfig(
        service="chat",
        app=Address("127.0.0.1", 8080),
        dependencies=("intent", "dialog"),
        instance=InstanceConfig(
            id="chat-1",
            address="10.0.0.5",
            labels=MappingProxyType({"version": "v1", "zone": "a"}),
            weight=2,
        ),
        control=ControlConfig(
            addresses=(Address("127.0.0.1", 15010), Address("::1", 15010)),
            state_dir=str(tmp_path / "state" / "chat"),  # relative to the file's folder
        ),
        health_check=HealthCheckConfig(path="/healthz", interval=2.0, timeout=0.5),
        source=str(path),
    )


def test_defaults() -> None:
    cfg = sidecar_config_from_mapping(
        {
            "service": "chat",
            "app": "a:1",
            "control": {"addresses": ["c:15010"]},
            "health_check": {},
        },
        "x",
    )
    assert cfg.dependencies == ()
    assert cfg.instance == InstanceConfig(id=None, address=None, labels=MappingProxyType({}))
    assert cfg.control == ControlConfig(addresses=(Address("c", 15010),), state_dir=None)
    assert cfg.health_check == HealthCheckConfig(path="/healthz", interval=2.0, timeout=1.0)
    static = sidecar_config_from_mapping({"service": "chat", "app": "a:1"}, "x")
    assert (static.control, static.health_check) == (None, None)


def test_wildcard_dependency() -> None:
    cfg = sidecar_config_from_mapping({"service": "c", "app": "a:1", "dependencies": ["*"]}, "x")
    assert cfg.dependencies == ("*",)


INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("deps_not_list", {"dependencies": "intent"},
     ["dependencies: expected a list of service names, or ['*'] for all, found string 'intent'"]),
    ("deps_star_mixed", {"dependencies": ["intent", "*"]},
     ["dependencies[1]: '*' means every service: list it alone"]),
    ("deps_repeated_and_bad", {"dependencies": ["intent", "intent", "Dialog"]},
     ["dependencies[1]: 'intent' is already listed at [0]",
      "dependencies[2]: invalid name 'Dialog': use lowercase letters, digits and '-', starting "
      "and ending with a letter or digit, at most 63 characters"]),
    ("instance_fields", {"instance": {"id": "Chat_1", "address": "0.0.0.0", "weight": 0,
                                      "labels": {"v": 1}, "zone": "a"}},
     ["instance.zone: unknown field 'zone'; expected one of: id, address, labels, weight",
      "instance.id: invalid instance id 'Chat_1': use lowercase letters, digits, '-' and '.', "
      "starting and ending with a letter or digit, at most 253 characters",
      "instance.address: '0.0.0.0' is a wildcard: give the address callers reach this "
      "instance at",
      "instance.weight: must be between 1 and 10000, found 0",
      "instance.labels.v: expected a string, found integer 1 (quote it to make it a string)"]),
    ("instance_address_with_port", {"instance": {"address": "10.0.0.5:80"}},
     ["instance.address: '10.0.0.5:80' is not an IP address or host name (no port here)"]),
    ("control_null", {"control": None}, ["control: expected a mapping, found null"]),
    ("control_without_addresses", {"control": {"state_dir": "/tmp/x"}},
     ["control.addresses: required field is missing: the control daemon's 'host:port' "
      "addresses"]),
    ("control_empty_addresses", {"control": {"addresses": []}},
     ["control.addresses: must list at least one address"]),
    ("control_addresses", {"control": {"addresses": ["c:1", "c:1", "c", "c:0"],
                                       "state_dir": ""}},
     ["control.addresses[1]: c:1 is already listed at [0]",
      "control.addresses[2]: invalid address 'c': missing ':port'",
      "control.addresses[3]: invalid address 'c:0': port must be between 1 and 65535, found 0",
      "control.state_dir: must not be empty (leave it out to keep no state)"]),
    ("health_check", {"health_check": {"path": "healthz", "interval": 0, "timeout": "x"}},
     ["health_check.path: expected a request path like '/healthz', found 'healthz'",
      "health_check.interval: must be greater than 0, found 0",
      "health_check.timeout: expected a duration like '250ms', '1s', '5m', '1m30s' or a "
      "number of seconds, found string 'x'"]),
    ("health_timeout_over_interval", {"health_check": {"interval": "1s", "timeout": "2s"}},
     ["health_check.timeout: must not exceed interval (1s), found 2s"]),
    ("health_path_with_space", {"health_check": {"path": "/a b"}},
     ["health_check.path: expected a request path like '/healthz', found '/a b'"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "messages"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID]
)
def test_invalid(extra: dict[str, Any], messages: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        sidecar_config_from_mapping({"service": "chat", "app": "a:1", **extra}, "x")
    assert [f"{p.path}: {p.message}" for p in info.value.problems] == messages


def test_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text(
        textwrap.dedent("""\
        service: chat
        app: 127.0.0.1:8080
        control:
          addresses:
            - 127.0.0.1:15010
            - nowhere
        """)
    )
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    assert (
        str(info.value)
        == f"{path}:6: control.addresses[1]: invalid address 'nowhere': missing ':port'"
    )


def test_json_view_round_trips_and_leaves_defaults_out(tmp_path: Path) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text(FULL)
    cfg = load_sidecar_config(path)
    data = sidecar_config_to_json(cfg)
    assert {k: data[k] for k in ("dependencies", "instance", "control", "health_check")} == {
        "dependencies": ["intent", "dialog"],
        "instance": {
            "id": "chat-1",
            "address": "10.0.0.5",
            "labels": {"version": "v1", "zone": "a"},
            "weight": 2,
        },
        "control": {
            "addresses": ["127.0.0.1:15010", "[::1]:15010"],
            "state_dir": str(tmp_path / "state" / "chat"),
        },
        "health_check": {"path": "/healthz", "interval": 2.0, "timeout": 0.5},
    }
    source = data.pop("source")
    assert sidecar_config_from_mapping(data, source) == cfg
    static = sidecar_config_to_json(SidecarConfig(service="chat", app=Address("a", 1)))
    assert not {"dependencies", "instance", "control", "health_check"} & set(static)


def test_reference_doc_example_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "sidecar-config.md").read_text()
    section = doc.split("## Fed by the control daemon\n", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "chat.yaml"
    path.write_text(example)
    cfg = load_sidecar_config(path)
    assert cfg.dependencies == ("intent", "dialog")
    assert cfg.control is not None and len(cfg.control.addresses) == 2
    assert cfg.health_check == HealthCheckConfig()
