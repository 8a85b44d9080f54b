"""The demo mesh's layout: ports, sidecar configs fed by control, process tiers."""

import socket
import sys

import pytest
import yaml

from lepton_mesh.demo.topology import (
    PORTS_NEEDED,
    app_specs,
    control_spec,
    etcd_spec,
    free_ports,
    plan,
    sidecar_config,
    sidecar_specs,
    write_configs,
)
from lepton_mesh.policy.sidecar_loader import load_sidecar_config

PORTS = list(range(20001, 20001 + PORTS_NEEDED))


def test_plan_hands_out_ports_in_order() -> None:
    mesh = plan(PORTS)
    assert (mesh.etcd_client, mesh.etcd_peer, mesh.control, mesh.admin_api) == (
        20001, 20002, 20003, 20004,
    )  # fmt: skip
    assert [(n.name, n.service, n.version, n.app, n.admin) for n in mesh.nodes] == [
        ("chat", "chat", "v1", 20005, 20008),
        ("intent", "intent", "v1", 20009, 20012),
        ("dialog-v1", "dialog", "v1", 20013, 20016),
        ("dialog-v2", "dialog", "v2", 20017, 20020),
    ]
    assert mesh.services == ("chat", "intent", "dialog")
    assert mesh.nodes_of("dialog") == mesh.dialogs == (mesh.dialog_v1, mesh.dialog_v2)


def test_chat_sidecar_knows_no_address_but_control_and_its_own() -> None:
    mesh = plan(PORTS)
    assert sidecar_config(mesh, mesh.chat) == {
        "service": "chat",
        "app": "127.0.0.1:20005",
        "listeners": {
            "outbound": "127.0.0.1:20006",
            "inbound": "127.0.0.1:20007",
            "admin": "127.0.0.1:20008",
        },
        "timeouts": {"drain": 2.0},
        "dependencies": ["intent", "dialog"],
        "instance": {"id": "chat", "labels": {"version": "v1"}},
        "control": {"addresses": ["127.0.0.1:20003"], "state_dir": "state/chat"},
        "health_check": {"path": "/healthz", "interval": "1s", "timeout": "500ms"},
    }


CALLEES = [
    # (node attribute, instance id, version label)
    ("intent", "intent", "v1"),
    ("dialog_v1", "dialog-v1", "v1"),
    ("dialog_v2", "dialog-v2", "v2"),
]


@pytest.mark.parametrize(("attr", "instance", "version"), CALLEES)
def test_callees_call_nothing_and_register_their_version(
    attr: str, instance: str, version: str
) -> None:
    mesh = plan(PORTS)
    config = sidecar_config(mesh, getattr(mesh, attr))
    assert config["dependencies"] == []
    assert config["instance"] == {"id": instance, "labels": {"version": version}}
    assert config["control"]["state_dir"] == f"state/{instance}"


def test_written_configs_load_with_the_sidecars_own_loader(tmp_path) -> None:
    mesh = plan(PORTS)
    configs = write_configs(mesh, tmp_path)
    assert sorted(configs) == ["chat", "dialog-v1", "dialog-v2", "intent"]
    for node in mesh.nodes:
        assert yaml.safe_load(configs[node.name].read_text()) == sidecar_config(mesh, node)
        cfg = load_sidecar_config(str(configs[node.name]))
        assert cfg.service == node.service


@pytest.mark.parametrize(
    "ports",
    [PORTS[:-1], [*PORTS[:-1], PORTS[0]]],
    ids=["too few", "duplicate"],
)
def test_plan_rejects_bad_port_lists(ports: list[int]) -> None:
    with pytest.raises(ValueError, match="distinct ports"):
        plan(ports)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(PORTS_NEEDED)
    assert len(set(ports)) == PORTS_NEEDED
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_process_specs_and_their_probes(tmp_path) -> None:
    mesh = plan(PORTS)
    etcd = etcd_spec(mesh, ("etcd", "--name=demo"))
    assert (etcd.name, etcd.argv) == ("etcd", ("etcd", "--name=demo"))
    assert [p.describe() for p in etcd.probes] == ["GET http://127.0.0.1:20001/health -> 200"]

    control = control_spec(mesh, tmp_path / "token.key")
    assert control.argv[1:] == (
        "-m", "lepton_mesh", "control", "--etcd", "127.0.0.1:20001",
        "--listen", "127.0.0.1:20003", "--admin", "127.0.0.1:20004",
        "--token-key", str(tmp_path / "token.key"), "--id", "demo-control",
    )  # fmt: skip
    assert [p.describe() for p in control.probes] == [
        "GET http://127.0.0.1:20004/ready -> 200",
        "TCP connect 127.0.0.1:20003",
    ]

    apps = app_specs(mesh)
    assert [s.name for s in apps] == ["chat-app", "intent-app", "dialog-v1-app", "dialog-v2-app"]
    assert apps[0].argv[-4:] == ("--port", "20005", "--outbound", "127.0.0.1:20006")
    assert apps[3].argv[-4:] == ("--port", "20017", "--version", "v2")
    assert apps[3].argv[:3] == (sys.executable, "-m", "lepton_mesh.demo.apps")

    configs = write_configs(mesh, tmp_path)
    sidecars = sidecar_specs(mesh, configs)
    assert [s.name for s in sidecars] == [
        "chat-sidecar", "intent-sidecar", "dialog-v1-sidecar", "dialog-v2-sidecar",
    ]  # fmt: skip
    assert sidecars[3].argv[-3:] == ("sidecar", "--config", str(configs["dialog-v2"]))
    assert [p.describe() for p in sidecars[0].probes] == ["GET http://127.0.0.1:20008/ready -> 200"]
