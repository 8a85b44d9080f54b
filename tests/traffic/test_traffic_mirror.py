"""Traffic mirroring, end to end: the shadow backend receives copies (Host
`<name>-shadow`), its failures and slowness never reach the primary request,
and `lepton_mirror_requests_total` counts each copy's outcome."""

from __future__ import annotations

import statistics
import time

import pytest
from proxy_harness import LOCAL, Address, client, free_port, outbound, request_bytes, wait_for
from traffic_support import (
    DELAY,
    HOLD,
    OK,
    RESET,
    STATUS,
    call,
    drive,
    mesh_config,
    metric,
    route,
    scrape,
    start_backend,
)

from lepton_mesh.policy.traffic import Backend, Mirror, PathMatch, RouteMatch, RouteRule


def mirrored(percent: float = 100.0, timeout: float | None = None) -> RouteRule:
    return RouteRule(
        name="mirrored",
        matches=(RouteMatch(path=PathMatch("prefix", "/m")),),
        mirror=Mirror(Backend("shadow"), percent),
        timeout=timeout,
    )


async def mirror_outcomes(sc) -> dict[str, float]:
    samples = await scrape(sc)
    outcomes = ("ok", "failed", "timeout", "dropped")
    return {
        o: metric(samples, "lepton_mirror_requests_total", destination_service="shadow", outcome=o)
        or 0
        for o in outcomes
    }


async def wait_outcome(sc, outcome: str, count: int, timeout: float = 3.0) -> None:
    seen: dict[str, float] = {}

    async def poll() -> bool:
        seen.update(await mirror_outcomes(sc))
        return seen[outcome] >= count

    deadline = time.monotonic() + timeout
    while not await poll():
        assert time.monotonic() < deadline, f"mirror outcomes {seen}, wanted {outcome}={count}"


async def test_mirror_receives_copies(sidecars, upstreams) -> None:
    primary = await start_backend(upstreams, "primary")
    shadow = await start_backend(upstreams, "shadow")
    cfg = mesh_config({"svc": [primary], "shadow": [shadow]}, routes=[route("svc", mirrored())])
    sc = await sidecars(cfg)
    n = 10
    gets = await drive(
        outbound(sc),
        n,
        concurrency=2,
        make=lambda i: request_bytes("GET", f"/m/get/{i}", host="svc"),
    )
    posts = await drive(
        outbound(sc),
        n,
        concurrency=2,
        method="POST",
        make=lambda i: request_bytes("POST", f"/m/post/{i}", host="svc:8080", body=b"b%d" % i),
    )
    assert {(r.status, r.served_by) for r in gets + posts} == {(200, "primary")}
    await wait_for(lambda: shadow.hits == 2 * n, timeout=3, what="copies at the shadow")
    assert primary.hits == 2 * n  # the primary path is untouched: one try each
    copies = {r.target: r for r in shadow.requests}
    originals = {r.target: r for r in primary.requests}
    assert set(copies) == set(originals)
    for target, copy in copies.items():
        original = originals[target]
        assert (copy.method, copy.body) == (original.method, original.body)
        host = original.get("host")
        assert copy.get("host") == ("svc-shadow:8080" if host == "svc:8080" else "svc-shadow")
    # Requests outside the mirrored rule are not copied.
    assert (await call(outbound(sc), target="/other")).status == 200
    await wait_outcome(sc, "ok", 2 * n)
    assert shadow.hits == 2 * n
    assert await mirror_outcomes(sc) == {"ok": 2 * n, "failed": 0, "timeout": 0, "dropped": 0}


@pytest.mark.parametrize(
    ("shadow_mode", "outcome"),
    [
        (HOLD, "timeout"),  # hangs: the copy times out with the rule's timeout
        (DELAY, "ok"),  # slow (0.3 s)
        (RESET, "failed"),
        (STATUS, "failed"),  # 500
        ("refuse", "failed"),
    ],
)
async def test_mirror_never_affects_the_primary(sidecars, upstreams, shadow_mode, outcome) -> None:
    primary = await start_backend(upstreams, "primary")
    if shadow_mode == "refuse":
        shadow = None
        shadow_address = Address(LOCAL, free_port())
    else:
        shadow = await start_backend(upstreams, "shadow", shadow_mode, status=500, delay=0.3)
        shadow_address = shadow.address
    cfg = mesh_config(
        {"svc": [primary], "shadow": [shadow_address]},
        routes=[route("svc", mirrored(timeout=1.0))],
    )
    sc = await sidecars(cfg)

    n = 20
    base, mirror = [], []
    for i in range(n):  # interleaved, so machine noise hits both alike
        base.append(await call(outbound(sc), target=f"/plain/{i}"))
        mirror.append(await call(outbound(sc), target=f"/m/{i}"))
    assert {(r.status, r.served_by) for r in base + mirror} == {(200, "primary")}
    base_ms = statistics.median(r.latency for r in base) * 1000
    mirror_ms = statistics.median(r.latency for r in mirror) * 1000
    worst_ms = max(r.latency for r in mirror) * 1000
    print(
        f"\nshadow {shadow_mode}: primary median {mirror_ms:.2f} ms with mirror, "
        f"{base_ms:.2f} ms without; worst {worst_ms:.2f} ms"
    )
    assert mirror_ms < base_ms + 5
    # A hanging or 300 ms shadow would show here; the margin absorbs a loaded
    # 2-core CI machine (110 ms stalls were seen with other suites running).
    assert worst_ms < 250

    if shadow is not None and shadow_mode != "refuse":
        await wait_for(lambda: shadow.hits == n, timeout=3, what="copies at the shadow")
    await wait_outcome(sc, outcome, n)
    outcomes = await mirror_outcomes(sc)
    assert outcomes[outcome] == n
    assert sum(outcomes.values()) == n
    assert primary.hits == 2 * n


async def test_mirror_percent(sidecars, upstreams) -> None:
    primary = await start_backend(upstreams, "primary")
    shadow = await start_backend(upstreams, "shadow", OK)
    cfg = mesh_config(
        {"svc": [primary], "shadow": [shadow]}, routes=[route("svc", mirrored(percent=30))]
    )
    sc = await sidecars(cfg)
    n = 600
    await drive(
        outbound(sc), n, concurrency=4, make=lambda i: request_bytes("GET", f"/m/{i}", host="svc")
    )
    await wait_outcome(sc, "ok", 1)
    await wait_for(lambda: shadow.in_flight == 0)
    copied = (await mirror_outcomes(sc))["ok"]
    await wait_for(lambda: shadow.hits == copied)
    print(f"\nmirror 30%: {copied / n:.1%} copied")
    assert 0.24 <= copied / n <= 0.36


async def test_mirror_of_pipelined_requests(sidecars, upstreams) -> None:
    """Pipelined requests start whole (head and body already read), so their
    copy is made at once, inside the primary's own routing step; it must
    still leave the primary untouched and copy every request."""
    primary = await start_backend(upstreams, "primary")
    shadow = await start_backend(upstreams, "shadow")
    cfg = mesh_config({"svc": [primary], "shadow": [shadow]}, routes=[route("svc", mirrored())])
    sc = await sidecars(cfg)
    n = 5
    pipelined = b"".join(
        request_bytes("POST", f"/m/{i}", host="svc", body=b"p%d" % i) for i in range(n)
    )
    async with client(outbound(sc)) as c:
        await c.send(pipelined)
        responses = [await c.response("POST") for _ in range(n)]
    assert [(r.status, r.get("x-served-by")) for r in responses] == [(200, "primary")] * n
    await wait_for(lambda: shadow.hits == n, timeout=3, what="copies at the shadow")
    assert sorted(r.body for r in shadow.requests) == [b"p%d" % i for i in range(n)]


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_failing_mirror_setup_never_fails_the_primary(
    sidecars, upstreams, monkeypatch, pipelined
) -> None:
    """Whatever goes wrong while starting a copy stays with the copy. (A bug of
    this kind shipped once: a missing slot in MirrorCall made every
    start_mirror raise, and pipelined mirrored requests then never got an
    answer, because a request started whole is mirrored inside Exchange.begin.)"""
    from lepton_mesh.proxy.http import exchange

    def broken(*args, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("mirror setup failed")

    monkeypatch.setattr(exchange, "start_mirror", broken)
    primary = await start_backend(upstreams, "primary")
    shadow = await start_backend(upstreams, "shadow")
    cfg = mesh_config({"svc": [primary], "shadow": [shadow]}, routes=[route("svc", mirrored())])
    sc = await sidecars(cfg)
    n = 3
    requests = [request_bytes("POST", f"/m/{i}", host="svc", body=b"p%d" % i) for i in range(n)]
    async with client(outbound(sc)) as c:
        if pipelined:
            await c.send(b"".join(requests))
            responses = [await c.response("POST", timeout=2) for _ in range(n)]
        else:
            responses = [await c.request(r, "POST") for r in requests]
    assert [(r.status, r.get("x-served-by")) for r in responses] == [(200, "primary")] * n
    assert shadow.hits == 0
