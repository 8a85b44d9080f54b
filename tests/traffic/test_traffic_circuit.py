"""Circuit breaking, end to end: past a limit the sidecar answers 503 `overflow`
at once and queues nothing; the state shows on `/clusters` and in metrics."""

from __future__ import annotations

import asyncio
import time

import pytest
from proxy_harness import (
    RawClient,
    assert_lepton_error,
    http,
    outbound,
    read_response,
    request_bytes,
    response_bytes,
    wait_for,
)
from traffic_support import (
    HOLD,
    Unanswered,
    call,
    clusters,
    destination,
    mesh_config,
    metric,
    reset_on_close,
    scrape,
    start_backend,
)

from lepton_mesh.policy.traffic import Backoff, CircuitLimits, RetryPolicy
from lepton_mesh.proxy.errors import Reason


async def test_overflow_answers_503_immediately(sidecars, upstreams) -> None:
    slow = await start_backend(upstreams, "slow", HOLD)
    limits = CircuitLimits(max_requests=2)
    cfg = mesh_config(
        {"svc": [slow]},
        destinations=[
            destination("svc", limits=limits, retry=RetryPolicy(attempts=1), outlier=None)
        ],
    )
    sc = await sidecars(cfg)

    held = [await RawClient.connect(outbound(sc)) for _ in range(2)]
    try:
        for i, c in enumerate(held):
            await c.send(request_bytes("GET", f"/held/{i}", host="svc"))
        await wait_for(lambda: slow.in_flight == 2, what="two requests held upstream")

        view = (await clusters(sc))["svc"]["circuit"]["requests"]
        assert view == {"used": 2, "max": 2, "open": True, "overflows": 0}

        third = await call(outbound(sc), target="/third")
        assert_lepton_error(third.response, 503, Reason.OVERFLOW)
        print(f"\noverflow answered in {third.latency * 1000:.2f} ms")
        assert third.latency < 0.05, third.latency  # never queued behind the held two
        assert slow.hits == 2  # the third never reached the upstream

        samples = await scrape(sc)
        labels = {"destination_service": "svc", "limit": "requests"}
        assert metric(samples, "lepton_circuit_overflows_total", **labels) == 1
        assert metric(samples, "lepton_circuit_open", **labels) == 1

        slow.release()
        first = [await asyncio.wait_for(read_response(c.reader), 5) for c in held]
        assert [r.status for r in first] == [200, 200]
    finally:
        for c in held:
            await c.close()

    # The slots are free again.
    await wait_for(lambda: slow.in_flight == 0)
    again = await call(outbound(sc), target="/again")
    assert again.status == 200
    view = (await clusters(sc))["svc"]["circuit"]["requests"]
    assert view == {"used": 0, "max": 2, "open": False, "overflows": 1}
    samples = await scrape(sc)
    labels = {"destination_service": "svc", "limit": "requests"}
    assert metric(samples, "lepton_circuit_open", **labels) == 0


async def test_overflow_under_a_burst_is_exact(sidecars, upstreams) -> None:
    """Twenty concurrent requests against max_requests 5: exactly five reach
    the upstream, fifteen are refused at once, whatever the arrival order."""
    slow = await start_backend(upstreams, "slow", HOLD)
    cfg = mesh_config(
        {"svc": [slow]},
        destinations=[
            destination(
                "svc",
                limits=CircuitLimits(max_requests=5),
                retry=RetryPolicy(attempts=1),
                outlier=None,
            )
        ],
    )
    sc = await sidecars(cfg)
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(call(outbound(sc), target=f"/b{i}")) for i in range(20)]
    await wait_for(lambda: sum(t.done() for t in tasks) == 15, what="15 overflows")
    refused_within = time.perf_counter() - started
    await wait_for(lambda: slow.in_flight == 5)
    refused = [t.result() for t in tasks if t.done()]
    for r in refused:
        assert_lepton_error(r.response, 503, Reason.OVERFLOW)
    slow.release()
    results = await asyncio.gather(*tasks)
    assert sorted(r.status for r in results) == [200] * 5 + [503] * 15
    assert slow.hits == 5
    print(f"\n15 overflows answered within {refused_within * 1000:.1f} ms of the burst")
    assert (await clusters(sc))["svc"]["circuit"]["requests"]["overflows"] == 15


async def test_max_connections_overflow(sidecars, upstreams) -> None:
    """One connection allowed and held busy: a second concurrent request would
    need another, and is refused (the `connections` limit), not queued."""
    slow = await start_backend(upstreams, "slow", HOLD)
    cfg = mesh_config(
        {"svc": [slow]},
        destinations=[
            destination(
                "svc",
                limits=CircuitLimits(max_connections=1),
                retry=RetryPolicy(attempts=1),
                outlier=None,
            )
        ],
    )
    sc = await sidecars(cfg)
    first = asyncio.ensure_future(call(outbound(sc), target="/first"))
    await wait_for(lambda: slow.in_flight == 1)
    second = await call(outbound(sc), target="/second")
    assert_lepton_error(second.response, 503, Reason.OVERFLOW)
    assert second.latency < 0.05, second.latency
    slow.release()
    assert (await first).status == 200
    circuit = (await clusters(sc))["svc"]["circuit"]
    assert circuit["connections"]["overflows"] == 1
    assert circuit["requests"]["overflows"] == 0
    samples = await scrape(sc)
    labels = {"destination_service": "svc", "limit": "connections"}
    assert metric(samples, "lepton_circuit_overflows_total", **labels) == 1
    # The connection that exists is reused: the next request is served.
    assert (await call(outbound(sc), target="/third")).status == 200


async def test_max_retries_limits_concurrent_retries(sidecars, upstreams) -> None:
    """max_retries 1: of two requests failing at once, one retries and the other
    gets its 503 as is (a `limit` refusal, counted), instead of piling on."""
    released = asyncio.Event()
    seen: list[str] = []

    async def app(req, conn) -> None:  # type: ignore[no-untyped-def]
        seen.append(req.target)
        if len(seen) <= 2:  # both first tries fail at once
            await conn.send(response_bytes(503, b"busy", [("x-served-by", "up")]))
            return
        await released.wait()  # the one retry waits until the test has looked
        await conn.send(response_bytes(200, b"ok", [("x-served-by", "up")]))

    up = await upstreams(http(app))
    policy = RetryPolicy(
        attempts=3, retry_on=frozenset({"5xx"}), backoff=Backoff(base=0.001, max=0.001)
    )
    cfg = mesh_config(
        {"svc": [up.address]},
        destinations=[
            destination("svc", limits=CircuitLimits(max_retries=1), retry=policy, outlier=None)
        ],
    )
    sc = await sidecars(cfg)
    tasks = [asyncio.ensure_future(call(outbound(sc), target=f"/r{i}")) for i in range(2)]
    await wait_for(lambda: len(seen) == 3, what="two failures and one retry upstream")
    await wait_for(lambda: any(t.done() for t in tasks), what="the refused request's answer")
    (refused,) = [t.result() for t in tasks if t.done()]
    assert (refused.status, refused.attempts, refused.response.body) == (503, 1, b"busy")
    circuit = (await clusters(sc))["svc"]["circuit"]["retries"]
    assert circuit == {"used": 1, "max": 1, "open": True, "overflows": 1}
    released.set()
    results = await asyncio.gather(*tasks)
    assert sorted((r.status, r.attempts) for r in results) == [(200, 2), (503, 1)]
    samples = await scrape(sc)
    labels = {"destination_service": "svc"}
    assert metric(samples, "lepton_retries_total", **labels, outcome="limit") == 1
    assert metric(samples, "lepton_retries_total", **labels, outcome="attempted") == 1
    assert metric(samples, "lepton_circuit_overflows_total", **labels, limit="retries") == 1
    assert (await clusters(sc))["svc"]["circuit"]["retries"]["used"] == 0


@pytest.mark.parametrize("ending", ["overall_timeout", "client_reset"])
async def test_pending_slot_is_released_when_a_connect_is_abandoned(
    sidecars, upstreams, ending
) -> None:
    """A request that ends while its connection is still being opened (the
    overall timeout passes, or the client resets) gives its `pending` slot
    back: otherwise every such request would shrink max_pending for good,
    until the destination answers nothing but 503 overflow."""
    hung = Unanswered()
    try:
        cfg = mesh_config(
            {"svc": [hung.address]},
            destinations=[
                destination(
                    "svc",
                    timeout=0.2 if ending == "overall_timeout" else 0,
                    limits=CircuitLimits(max_pending=1),
                    retry=RetryPolicy(attempts=1),
                    outlier=None,
                )
            ],
        )
        sc = await sidecars(cfg)

        async def pending() -> int:
            return (await clusters(sc))["svc"]["circuit"]["pending"]["used"]

        for _ in range(2):  # with max_pending 1, a leaked slot fails the second round
            if ending == "overall_timeout":
                result = await call(outbound(sc))
                assert_lepton_error(result.response, 504, Reason.UPSTREAM_TIMEOUT)
            else:
                c = await RawClient.connect(outbound(sc))
                await c.send(request_bytes("GET", "/", host="svc"))
                await wait_for_async(lambda: pending(), 1)
                reset_on_close(c)
                await c.close()
            await wait_for_async(lambda: pending(), 0)
        circuit = (await clusters(sc))["svc"]["circuit"]
        assert (circuit["requests"]["used"], circuit["pending"]["overflows"]) == (0, 0)
    finally:
        hung.close()


async def wait_for_async(read, want, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll an async reading until it equals `want` (fails after `timeout`)."""
    deadline = time.perf_counter() + timeout
    while (got := await read()) != want:
        assert time.perf_counter() < deadline, f"still {got}, want {want}"
        await asyncio.sleep(0.005)
