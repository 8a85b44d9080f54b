"""Failures with real processes: a control replica killed under traffic, etcd stopped,
a sidecar restarted while every control replica is down.

The data plane must not notice: calls through the sidecars are counted and
none may fail. Each test measures how long the mesh took to recover.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tests.system.system_support import (
    Mesh,
    Traffic,
    call_many,
    endpoints,
    report,
    wait_for,
)

LEASE_LOST = re.compile(r"lease of (\S+) lost")


def leases_of(mesh: Mesh, replica: str) -> set[int]:
    """etcd leases kept alive by `replica`: its sidecars' keys and, if it leads, the election's."""
    leases = set()
    for key, value, lease in mesh.etcd_kvs("/lepton/v1/"):
        if (key.startswith("/lepton/v1/sidecars/") and value["control"] == replica) or (
            key == "/lepton/v1/election/leader" and value["replica"] == replica
        ):
            leases.add(lease)
    return leases - {0}


def test_killing_a_control_replica_under_traffic_fails_no_request(settled: Mesh) -> None:
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    victim = chat.status()["control_id"]
    (survivor,) = set(mesh.replicas) - {victim}
    moving = [s for s in mesh.sidecars.values() if s.status()["control_id"] == victim]
    assert chat in moving and len(moving) < len(mesh.sidecars)
    leases = leases_of(mesh, victim)
    assert len(leases) >= len(moving)
    since = mesh.etcd_revision()

    with Traffic(chat.outbound_port) as traffic:
        traffic.wait_ok(50)
        killed = time.monotonic()
        sent_before = traffic.total
        mesh.replicas[victim].kill()
        moved: dict[str, float] = {}

        def all_moved() -> bool:
            for s in moving:
                st = s.status()
                if s.name not in moved and st["connected"] and st["control_id"] == survivor:
                    moved[s.name] = time.monotonic() - killed
            return len(moved) == len(moving)

        wait_for(all_moved, 15, f"{[s.name for s in moving]} reconnected to {survivor}")
        failover = max(moved.values())

        def registered_on_survivor() -> bool:
            rows = mesh.api("GET", "/sidecars", replica=survivor)["items"]
            return {r["node_id"]: r["control"] for r in rows} == dict.fromkeys(
                mesh.sidecars, survivor
            )

        wait_for(registered_on_survivor, 10, f"every sidecar registered on {survivor}")
        # The dead replica's leases expire; the keys they held moved to the survivor's.
        wait_for(
            lambda: not (leases & mesh.live_leases()),
            mesh.lease_ttl + 5,
            f"{victim}'s leases expired",
            interval=0.2,
        )
        expired = time.monotonic() - killed
        traffic.wait_ok(50)
        sent_during = traffic.total - sent_before
        assert endpoints(chat.config(), "intent") == dict.fromkeys(mesh.inbounds("intent"), True)
    report(
        "control replica SIGKILLed -> its sidecars reconnected to the other",
        ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(moved.items()))
        + f"; failed calls {len(traffic.failures)} of {sent_during} sent from the kill until "
        f"its leases expired ({expired:.1f} s after it)",
    )
    assert traffic.failures == [], traffic.failures[:10]
    assert failover < 10
    assert set(traffic.by_body) == {"intent-1", "intent-2"}
    # Re-registered on the survivor by moving the keys to its leases: never out of etcd.
    assert mesh.instance_gaps(since) == {}


def test_a_sidecar_restarted_while_control_is_down_boots_from_last_known_good(
    settled: Mesh,
) -> None:
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    status: dict[str, Any] = wait_for(
        lambda: (st := chat.status())["persisted_version"] == st["applied_version"] and st,
        5,
        "chat's snapshot saved",
        explain=mesh.logs,
    )
    assert (chat.state_dir / "last-known-good.json").exists()

    for replica in mesh.replicas.values():
        replica.kill()
    wait_for(lambda: not chat.status()["connected"], 10, "chat lost its control stream")
    assert chat.stop() == 0, chat.tail()
    started = time.monotonic()
    chat.start()
    wait_for(chat.ready, 15, "chat ready from last-known-good", explain=chat.tail)
    ready_after = time.monotonic() - started
    st = chat.status()
    assert st["from_last_known_good"] is True and st["connected"] is False
    assert st["applied_version"] == status["applied_version"]
    assert set(endpoints(chat.config(), "intent")) == set(mesh.inbounds("intent"))
    seen = call_many(chat.outbound_port, 20)
    assert set(seen) == {"200 intent-1", "200 intent-2"}, seen

    restarted = time.monotonic()
    for replica in mesh.replicas.values():
        replica.start()
    wait_for(
        lambda: (st := chat.status())["connected"] and not st["from_last_known_good"],
        20,
        "chat fed by control again",
        explain=mesh.logs,
    )
    report(
        "sidecar restarted with both control replicas down",
        f"ready from last-known-good in {ready_after:.2f} s (includes the 1.5 s wait for control), "
        f"served 20/20 calls; fed by control {time.monotonic() - restarted:.1f} s after they returned",
    )


def test_an_etcd_outage_longer_than_the_lease_ttl_drops_no_live_instance(settled: Mesh) -> None:
    """The replicas give their sidecars' leases up while etcd is away and re-register them
    when it is back: the instances must move to the new leases without ever leaving etcd,
    or callers drop live endpoints (and calls fail) for a moment."""
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    since = mesh.etcd_revision()
    old = {key: lease for key, _, lease in mesh.etcd_kvs("/lepton/v1/instances/")}
    offsets = {name: r.log_size() for name, r in mesh.replicas.items()}

    def given_up() -> set[str]:
        text = "".join(mesh.replicas[n].log_since(o) for n, o in offsets.items())
        return set(LEASE_LOST.findall(text))

    with Traffic(chat.outbound_port) as traffic:
        traffic.wait_ok(20)
        stopped = time.monotonic()
        mesh.etcd.stop()
        # The replicas' own account (their log): each lease is assumed expired.
        wait_for(
            lambda: given_up() == set(mesh.sidecars),
            mesh.lease_ttl + 10,
            "every sidecar's lease given up",
            interval=0.1,
        )
        down_for = time.monotonic() - stopped
        mesh.etcd.start()
        for replica in mesh.replicas.values():
            wait_for(lambda r=replica: mesh.store_healthy(r), 15, f"{replica.name} sees etcd back")

        def moved() -> bool:
            now = {key: lease for key, _, lease in mesh.etcd_kvs("/lepton/v1/instances/")}
            live = mesh.live_leases()
            return now.keys() == old.keys() and all(
                lease != old[key] and lease in live for key, lease in now.items()
            )

        wait_for(moved, 15, "every instance on a new lease", interval=0.1)
        traffic.wait_ok(50)
    gaps = mesh.instance_gaps(since)
    report(
        "etcd down longer than the lease TTL, then back",
        f"{len(traffic.failures)} failed calls of {traffic.total} ({down_for:.1f} s down); "
        f"revisions with a live instance missing from etcd: {gaps or 'none'}",
    )
    assert gaps == {}, f"live instances missing from etcd at these revisions: {gaps}"
    assert traffic.failures == [], traffic.failures[:10]
