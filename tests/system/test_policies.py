"""Policy as code against real processes: apply reaches and is ACKed by every sidecar,
and a rollback restores the routing calls actually take."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from tests.system.system_support import (
    Mesh,
    call_many,
    report,
    route_to,
    subsets,
    wait_for,
)

APPLIED = re.compile(r"applied as policy revision (\d+)")


def route_backends(cfg: dict[str, Any], destination: str) -> list[str] | None:
    """The subsets of the Route for `destination` in a sidecar's /config (None: no Route)."""
    for p in cfg.get("policies", []):
        if p["kind"] == "Route" and p["spec"]["destination"] == destination:
            return [b.get("subset") for r in p["spec"]["rules"] for b in r["backends"]]
    return None


def apply(mesh: Mesh, name: str, manifests: list[dict[str, Any]], message: str, **kw: str) -> int:
    path = mesh.write_policies(name, manifests)
    done = mesh.cli("apply", str(path), "-m", message, **kw)
    assert done.returncode == 0, done.stderr
    m = APPLIED.search(done.stdout)
    assert m, done.stdout
    return int(m.group(1))


def sidecars_json(mesh: Mesh, replica: str) -> dict[str, dict[str, Any]]:
    """`lepton-mesh get sidecars -o json`, by node id."""
    done = mesh.cli("get", "sidecars", "-o", "json", replica=replica, token=mesh.read_token)
    assert done.returncode == 0, done.stderr
    return {row["node_id"]: row for row in json.loads(done.stdout)}


def test_apply_is_acked_by_every_connected_sidecar(settled: Mesh) -> None:
    mesh = settled
    before = sidecars_json(mesh, "replica-b")
    assert set(before) == set(mesh.sidecars)
    bundle = [  # concerns every sidecar: chat and dialog call intent, the intents call dialog
        subsets("intent", "v1", "v2"),
        route_to("intent", ("v1", 50), ("v2", 50)),
        subsets("dialog", "v1"),
    ]
    started = time.monotonic()
    apply(mesh, "split", bundle, "intent 50/50", replica="replica-a")
    applied = time.monotonic()
    acked: dict[str, float] = {}

    def all_acked() -> bool:
        rows = {r["node_id"]: r for r in mesh.api("GET", "/sidecars", replica="replica-b")["items"]}
        for node, row in rows.items():
            if node not in acked and row["applied_version"] > before[node]["applied_version"]:
                acked[node] = time.monotonic() - started
        return len(acked) == len(mesh.sidecars)

    wait_for(all_acked, 10, "every sidecar's ACK of the new version recorded")
    report(
        "apply -> every sidecar's ACK recorded (read on the other replica)",
        f"{(max(acked.values()) - (applied - started)) * 1000:.0f} ms after `lepton-mesh apply` "
        f"returned (which took {(applied - started) * 1000:.0f} ms)",
    )

    after = sidecars_json(mesh, "replica-b")
    for node, sidecar in mesh.sidecars.items():
        row, cfg = after[node], sidecar.config()
        assert row["last_nack"] is None, row
        assert row["applied_version"] == cfg["control_status"]["applied_version"], node
        kinds = sorted(f"{p['kind']}/{p['metadata']['name']}" for p in cfg["policies"])
        want = ["DestinationPolicy/dialog"]
        if "intent" in sidecar.spec.dependencies:
            want = ["DestinationPolicy/intent", "Route/intent"]
        assert kinds == want, node


def test_rollback_restores_routing(settled: Mesh) -> None:
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    port = chat.outbound_port

    def chat_routes_to(subset: str) -> bool:
        return route_backends(chat.config(), "intent") == [subset]

    v1 = apply(mesh, "v1", [subsets("intent", "v1", "v2"), route_to("intent", ("v1", 100))], "v1")
    wait_for(lambda: chat_routes_to("v1"), 10, "chat routes intent to v1")
    assert call_many(port, 20) == {"200 intent-1": 20}

    apply(mesh, "v2", [route_to("intent", ("v2", 100))], "all of intent to v2")
    wait_for(lambda: chat_routes_to("v2"), 10, "chat routes intent to v2")
    served_by_v1 = mesh.apps["intent-1"].requests
    assert call_many(port, 20) == {"200 intent-2": 20}
    assert mesh.apps["intent-1"].requests == served_by_v1

    started = time.monotonic()
    done = mesh.cli("rollback", str(v1), "-m", "v2 misbehaves", replica="replica-b")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: chat_routes_to("v1"), 10, "chat routes intent to v1 again")
    report(
        "rollback -> the caller routes by the restored Route",
        f"{(time.monotonic() - started) * 1000:.0f} ms",
    )
    served_by_v2 = mesh.apps["intent-2"].requests
    assert call_many(port, 20) == {"200 intent-1": 20}
    assert mesh.apps["intent-2"].requests == served_by_v2

    history = mesh.cli("history", "intent", "-o", "json", token=mesh.read_token)
    assert history.returncode == 0, history.stderr
    newest = json.loads(history.stdout)[0]
    assert (newest["rollback_of"], newest["who"], newest["message"]) == (
        v1,
        "system",
        "v2 misbehaves",
    )
