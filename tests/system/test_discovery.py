"""Registry and discovery with real processes: register, call, kill -9, health, scoping.

Every call crosses two sidecar processes (chat's outbound, intent's inbound)
fed by two control replicas on a real etcd; see system_support.py.
"""

from __future__ import annotations

import signal
import time

from tests.system.system_support import (
    Mesh,
    call_many,
    endpoints,
    report,
    route_to,
    subsets,
    wait_for,
)


def test_sidecars_register_discover_and_call_through_two_sidecars(settled: Mesh) -> None:
    mesh = settled
    # Every sidecar is registered, on either replica, and each replica sees all of them.
    for replica in mesh.replicas:
        rows = mesh.api("GET", "/sidecars", replica=replica)["items"]
        assert {r["node_id"] for r in rows} == set(mesh.sidecars)
        assert {r["control"] for r in rows} == set(mesh.replicas), "both replicas serve sidecars"
    instances = mesh.api("GET", "/instances?service=intent")["items"]
    assert {(i["id"], i["labels"]["version"], i["healthy"]) for i in instances} == {
        ("intent-1", "v1", True),
        ("intent-2", "v2", True),
    }
    addresses = {f"{i['address']}:{i['ports']['http']}" for i in instances}
    assert addresses == set(mesh.inbounds("intent"))

    # The client plays the chat app: chat's sidecar balances over both intents.
    seen = call_many(mesh.sidecars["chat-1"].outbound_port, 20)
    assert set(seen) == {"200 intent-1", "200 intent-2"}, seen


def test_a_sidecar_killed_with_9_is_gone_from_every_callers_endpoints(settled: Mesh) -> None:
    mesh = settled
    victim = mesh.sidecars["intent-2"]
    callers = [s for s in mesh.sidecars.values() if "intent" in s.spec.dependencies]
    assert {c.name for c in callers} == {"chat-1", "dialog-1"}

    killed = time.monotonic()
    victim.signal(signal.SIGKILL)
    gone: dict[str, float] = {}

    def all_gone() -> bool:
        for caller in callers:
            if caller.name not in gone and victim.inbound not in endpoints(
                caller.config(), "intent"
            ):
                gone[caller.name] = time.monotonic() - killed
        return len(gone) == len(callers)

    wait_for(all_gone, mesh.lease_ttl + 5, "intent-2 gone from its callers' endpoints")
    victim.kill()  # reap it
    slowest = max(gone.values())
    report(
        "kill -9 sidecar -> gone from every caller's endpoints",
        ", ".join(f"{name} {t * 1000:.0f} ms" for name, t in sorted(gone.items()))
        + f" (lease TTL {mesh.lease_ttl} s: the stream's close revokes the lease at once)",
    )
    assert slowest < mesh.lease_ttl + 2.0
    assert [i["id"] for i in mesh.api("GET", "/instances?service=intent")["items"]] == ["intent-1"]
    assert "intent-2" not in {r["node_id"] for r in mesh.api("GET", "/sidecars")["items"]}
    seen = call_many(mesh.sidecars["chat-1"].outbound_port, 10)
    assert seen == {"200 intent-1": 10}


def test_an_unhealthy_app_gets_no_traffic_and_comes_back_when_healthy(settled: Mesh) -> None:
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    sick = mesh.sidecars["intent-1"]

    def health_in_chat() -> dict[str, bool]:
        return endpoints(chat.config(), "intent")

    turned = time.monotonic()
    sick.app.healthy = False
    wait_for(
        lambda: health_in_chat() == {sick.inbound: False, mesh.sidecars["intent-2"].inbound: True},
        10,
        "intent-1 unhealthy in chat's endpoints",
    )
    drained_after = time.monotonic() - turned
    # Not deregistered: the instance is there, marked unhealthy.
    (row,) = [
        i for i in mesh.api("GET", "/instances?service=intent")["items"] if i["id"] == "intent-1"
    ]
    assert row["healthy"] is False
    served = sick.app.requests
    seen = call_many(chat.outbound_port, 30)
    assert seen == {"200 intent-2": 30}
    assert sick.app.requests == served, "a call reached the unhealthy app"

    turned = time.monotonic()
    sick.app.healthy = True
    wait_for(lambda: all(health_in_chat().values()), 10, "intent-1 healthy again in chat")
    back_after = time.monotonic() - turned
    wait_for(
        lambda: call_many(chat.outbound_port, 4)["200 intent-1"] > 0, 10, "calls reach intent-1"
    )
    report(
        "app health fails -> out of its callers' balancing",
        f"{drained_after * 1000:.0f} ms (health check every 200 ms, 2 failures); "
        f"healthy again -> back in {back_after * 1000:.0f} ms",
    )


def test_a_sidecar_receives_only_its_dependencies(settled: Mesh) -> None:
    mesh = settled
    expected = {"chat-1": {"intent"}, "intent-1": {"dialog"}, "intent-2": {"dialog"}}
    expected["dialog-1"] = {"intent"}
    for name, services in expected.items():
        assert set(mesh.sidecars[name].config()["services"]) == services, name

    # Policies for dialog reach dialog's callers (the intents), and nobody else.
    chat = mesh.sidecars["chat-1"]
    chat_before = chat.status()["applied_version"]
    path = mesh.write_policies("dialog", [subsets("dialog", "v1"), route_to("dialog", ("v1", 100))])
    done = mesh.cli("apply", str(path), "-m", "dialog v1 only")
    assert done.returncode == 0, done.stderr

    def dialog_policies(name: str) -> list[str]:
        cfg = mesh.sidecars[name].config()
        return sorted(f"{p['kind']}/{p['metadata']['name']}" for p in cfg.get("policies", []))

    for name in ("intent-1", "intent-2"):
        wait_for(
            lambda n=name: dialog_policies(n) == ["DestinationPolicy/dialog", "Route/dialog"],
            10,
            f"{name} has dialog's policies",
        )
    assert dialog_policies("chat-1") == [] and dialog_policies("dialog-1") == []
    assert chat.status()["applied_version"] == chat_before, (
        "chat was sent a snapshot it does not need"
    )
    assert set(chat.config()["services"]) == {"intent"}
