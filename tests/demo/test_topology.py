"""The demo mesh's layout: ports, sidecar configs, process order."""

import socket

import pytest
import yaml

from lepton_mesh.demo.topology import (
    PORTS_NEEDED,
    free_ports,
    plan,
    process_specs,
    sidecar_config,
    write_configs,
)

PORTS = list(range(20001, 20001 + PORTS_NEEDED))


def test_chat_sidecar_routes_to_intent_inbound_and_a_dead_billing() -> None:
    mesh = plan(PORTS)
    assert sidecar_config(mesh, mesh.chat) == {
        "service": "chat",
        "app": "127.0.0.1:20001",
        "listeners": {
            "outbound": "127.0.0.1:20002",
            "inbound": "127.0.0.1:20003",
            "admin": "127.0.0.1:20004",
        },
        "timeouts": {"drain": 2.0},
        "services": {
            "intent": {"endpoints": ["127.0.0.1:20007"]},
            "billing": {"endpoints": ["127.0.0.1:20009"]},
        },
    }


def test_intent_sidecar_calls_nothing() -> None:
    mesh = plan(PORTS)
    config = sidecar_config(mesh, mesh.intent)
    assert (config["service"], config["app"], config["services"]) == (
        "intent",
        "127.0.0.1:20005",
        {},
    )


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


def test_specs_start_sidecars_before_apps_and_read_the_written_yaml(tmp_path) -> None:
    mesh = plan(PORTS)
    configs = write_configs(mesh, tmp_path)
    assert yaml.safe_load(configs["chat"].read_text()) == sidecar_config(mesh, mesh.chat)
    specs = process_specs(mesh, configs)
    assert [s.name for s in specs] == ["intent-sidecar", "chat-sidecar", "intent-app", "chat-app"]
    assert specs[1].argv[-3:] == ("sidecar", "--config", str(configs["chat"]))
    assert [p.describe() for p in specs[1].probes] == ["GET http://127.0.0.1:20004/ready -> 200"]
