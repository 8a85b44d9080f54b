"""What the admin API and the metrics say about traffic state, exactly, after a
known amount of healthy traffic; and that this state survives a config swap."""

from __future__ import annotations

from dataclasses import replace

from proxy_harness import outbound
from traffic_support import (
    STATUS,
    clusters,
    destination,
    drive,
    endpoint,
    endpoint_view,
    mesh_config,
    metric,
    scrape,
    start_backends,
)

from lepton_mesh.policy.sidecar_config import Endpoint
from lepton_mesh.policy.traffic import CircuitLimits, OutlierDetection, RetryPolicy, Subset

LIMITS = CircuitLimits(max_connections=50, max_pending=40, max_requests=30, max_retries=3)


async def test_clusters_and_metrics_after_healthy_traffic(sidecars, upstreams) -> None:
    backends = await start_backends(upstreams, "a", "b", "c")
    eps = [
        endpoint(backends[0].address, version="v1", zone="z1"),
        endpoint(backends[1].address, version="v1", zone="z2"),
        Endpoint(backends[2].address, weight=3, labels={"version": "v2"}),
    ]
    policy = destination(
        "svc",
        subsets=(Subset("v1", {"version": "v1"}), Subset("v2", {"version": "v2"})),
        limits=LIMITS,
    )
    sc = await sidecars(mesh_config({"svc": eps}, destinations=[policy]))
    n = 50
    results = await drive(outbound(sc), n, concurrency=1)
    assert {r.status for r in results} == {200}

    view = (await clusters(sc))["svc"]
    assert view["circuit"] == {
        "connections": {"used": 3, "max": 50, "open": False, "overflows": 0},
        "pending": {"used": 0, "max": 40, "open": False, "overflows": 0},
        "requests": {"used": 0, "max": 30, "open": False, "overflows": 0},
        "retries": {"used": 0, "max": 3, "open": False, "overflows": 0},
    }
    # 50 requests deposit 50 x 20% = 10 retries on top of the 10/s x 10 s reserve.
    assert view["retry_budget"] == {
        "available": 110,
        "requests_total": n,
        "retries_total": 0,
        "exhausted_total": 0,
    }
    assert (view["ejections_total"], view["panic"]) == (0, False)
    assert view["subsets"] == {
        "v1": [str(backends[0].address), str(backends[1].address)],
        "v2": [str(backends[2].address)],
    }
    entries = view["endpoints"]
    assert [e["address"] for e in entries] == [str(b.address) for b in backends]
    assert [e["weight"] for e in entries] == [1, 1, 3]
    assert [e["labels"] for e in entries] == [
        {"version": "v1", "zone": "z1"},
        {"version": "v1", "zone": "z2"},
        {"version": "v2"},
    ]
    assert [e["requests_total"] for e in entries] == [b.hits for b in backends]
    assert sum(e["requests_total"] for e in entries) == n
    # Weighted P2C with no load: shares follow weights 1:1:3.
    assert entries[2]["requests_total"] > entries[0]["requests_total"]
    for e in entries:
        assert (e["healthy"], e["ejected"], e["active_requests"]) == (True, False, 0)
        assert e["latency_ewma_ms"] > 0
        assert e["outlier"]["tracked"] is True
        assert e["outlier"]["consecutive_5xx"] == 0
        assert e["pool"] == {"active": 0, "idle": 1, "connecting": 0}

    samples = await scrape(sc)
    svc = {"destination_service": "svc"}
    assert metric(samples, "lepton_outlier_ejections_total", **svc) == 0
    for limit in ("connections", "pending", "requests", "retries"):
        assert metric(samples, "lepton_circuit_overflows_total", **svc, limit=limit) == 0
        assert metric(samples, "lepton_circuit_open", **svc, limit=limit) == 0
    for outcome in ("attempted", "budget_exhausted", "limit"):
        assert metric(samples, "lepton_retries_total", **svc, outcome=outcome) == 0
    assert metric(samples, "lepton_retry_budget_available", **svc) == 110
    for b in backends:
        assert metric(samples, "lepton_endpoint_ejected", **svc, endpoint=str(b.address)) == 0
    requests = metric(
        samples,
        "lepton_requests_total",
        reporter="source",
        source_workload="test",
        destination_service="svc",
        response_code="200",
        response_flags="-",
    )
    assert requests == n


async def test_ejection_survives_a_config_swap(sidecars, upstreams) -> None:
    """Endpoint state lives across snapshots: a new config for the same
    endpoints keeps the ejection (and its timer), counters and budget."""
    good, bad = await start_backends(upstreams, "good", "bad")
    bad.mode = STATUS
    policy = destination(
        "svc",
        retry=RetryPolicy(attempts=1),
        outlier=OutlierDetection(consecutive_5xx=1, base_ejection_time=30),
    )
    cfg = mesh_config({"svc": [good, bad]}, destinations=[policy])
    sc = await sidecars(cfg)
    while bad.hits == 0:
        await drive(outbound(sc), 1, concurrency=1)
    before = (await clusters(sc))["svc"]
    assert endpoint_view(before, bad)["ejected"] is True

    sc.swap_config(
        replace(cfg, traffic=replace(cfg.traffic, destinations={"svc": replace(policy, timeout=9)}))
    )
    assert sc.snapshot.targets["svc"].policy.timeout == 9
    after = (await clusters(sc))["svc"]
    assert endpoint_view(after, bad)["ejected"] is True
    assert after["ejections_total"] == 1
    assert after["retry_budget"]["requests_total"] == before["retry_budget"]["requests_total"]
    results = await drive(outbound(sc), 20, concurrency=2)
    assert {r.served_by for r in results} == {"good"}
    assert bad.hits == 1
