"""etcd stops while the mesh runs: sidecars keep serving, admin reads answer from the
replicas' caches, admin writes answer 503 `store_unavailable`; when etcd is back, a
new apply flows to the sidecars.

The outage here is shorter than the lease TTL (set long for this module), so the
replicas keep their sidecars' leases; an outage longer than the TTL is
test_failures.py's.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from tests.system.system_support import (
    Mesh,
    Traffic,
    report,
    route_to,
    subsets,
    wait_for,
)

MESH_LEASE_TTL = 60  # a replica gives a lease up after 2/3 of it without etcd


def route_subsets(cfg: dict[str, Any]) -> list[str]:
    return [
        b["subset"]
        for p in cfg.get("policies", [])
        if p["kind"] == "Route"
        for r in p["spec"]["rules"]
        for b in r["backends"]
    ]


def test_etcd_down_sidecars_serve_admin_writes_503_and_changes_flow_when_back(
    settled: Mesh,
) -> None:
    mesh = settled
    chat = mesh.sidecars["chat-1"]
    bundle = [subsets("intent", "v1", "v2"), route_to("intent", ("v2", 100))]
    path = mesh.write_policies("outage", bundle)
    since = mesh.etcd_revision()

    with Traffic(chat.outbound_port) as traffic:
        traffic.wait_ok(20)
        stopped = time.monotonic()
        mesh.etcd.stop()
        for replica in mesh.replicas.values():
            wait_for(
                lambda r=replica: not mesh.store_healthy(r), 15, f"{replica.name} sees etcd down"
            )
        noticed = time.monotonic() - stopped

        # Writes cannot be made: 503 store_unavailable from the API, exit 3 from the CLI
        # (both at once: each waits for the replica's etcd timeout).
        cli: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: cli.update(done=mesh.cli("apply", str(path), "-m", "while down"))
        )
        thread.start()
        asked = time.monotonic()
        resp = mesh.raw_api(
            "POST", "/policies:apply", {"manifests": bundle, "message": "x"}, admin=True, timeout=30
        )
        answered = time.monotonic() - asked
        thread.join(35)
        assert resp.status_code == 503, resp.text
        assert resp.json()["reason"] == "store_unavailable", resp.text
        assert resp.headers.get("Retry-After") == "1"
        done = cli["done"]
        assert done.returncode == 3, (done.returncode, done.stderr)

        # Reads answer from the replicas' caches, through the API and the CLI.
        for name in mesh.replicas:
            rows = mesh.api("GET", "/sidecars", replica=name)["items"]
            assert {r["node_id"] for r in rows} == set(mesh.sidecars)
            assert mesh.api("GET", "/policies", replica=name)["items"] == []
        got = mesh.cli("get", "instances", "intent", "-o", "json", token=mesh.read_token)
        assert got.returncode == 0, got.stderr
        assert {i["id"] for i in json.loads(got.stdout)} == {"intent-1", "intent-2"}

        traffic.wait_ok(50)  # the data plane serves from its snapshots meanwhile
        down_for = time.monotonic() - stopped
        restarted = time.monotonic()
        mesh.etcd.start()
        for replica in mesh.replicas.values():
            wait_for(lambda r=replica: mesh.store_healthy(r), 15, f"{replica.name} sees etcd back")
        healthy_after = time.monotonic() - restarted

        done = mesh.cli("apply", str(path), "-m", "after the outage")
        assert done.returncode == 0, done.stderr
        wait_for(lambda: route_subsets(chat.config()) == ["v2"], 10, "the new Route in chat")
        flowing_after = time.monotonic() - restarted
        # A call in flight when the Route arrived keeps the snapshot it started
        # with (by design) and may still land on v1; the next one cannot.
        traffic.wait_ok(1)
        to_v1 = traffic.by_body["intent-1"]
        traffic.wait_ok(20)
    report(
        "etcd stopped (shorter than the lease TTL)",
        f"replicas noticed in {noticed:.1f} s; admin write answered 503 store_unavailable in "
        f"{answered:.1f} s; {len(traffic.failures)} failed calls of {traffic.total} with etcd "
        f"down {down_for:.1f} s; etcd back -> replicas healthy in {healthy_after:.1f} s, an "
        f"apply reached chat {flowing_after:.1f} s after the restart",
    )
    assert traffic.failures == [], traffic.failures[:10]
    assert traffic.by_body["intent-1"] == to_v1, "calls reached v1 after the Route to v2"
    assert mesh.instance_gaps(since) == {}
