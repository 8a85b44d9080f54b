"""A pooled keep-alive connection the upstream had already closed, end to end.

The upstream here answers the first request on each connection and closes the
connection (FIN, no response) on any later one: what a sidecar sees when the
upstream's idle timeout closed a pooled connection just as it was reused. The
request (idempotent, no body) never reached the app, so it is sent once more
on a fresh connection to the same endpoint. That resend is not a try: it
counts in no attempt, leaves the retry policy's tries to real failures, and
happens at most once per try.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy_harness import Conn, Message, Upstream, http, outbound, response_bytes, wait_for
from traffic_support import Result, call, destination, mesh_config

from lepton_mesh.policy.traffic import Backoff, RetryPolicy
from lepton_mesh.proxy.errors import Reason

FAST = Backoff(base=0.001, max=0.004)
TIMEOUT = 3.0


@dataclass
class StaleUpstream:
    """Closes a connection on its second request; `statuses` script the answers to
    first requests (then 200); with `close_fresh` it closes on the first one too."""

    name: str
    statuses: list[int] = field(default_factory=list)
    close_fresh: bool = False
    hold_until: int = 0  # first requests wait until this many are in
    seen: list[tuple[str, bool]] = field(default_factory=list)  # shared: (name, on a reused conn)
    _first: int = 0
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)

    async def app(self, req: Message, conn: Conn) -> bool | None:
        reused = len(conn.requests) > 1
        self.seen.append((self.name, reused))
        if reused or self.close_fresh:
            return False
        self._first += 1
        if self._first >= self.hold_until:
            self._all_in.set()
        await self._all_in.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        await conn.send(response_bytes(status, self.name.encode(), [("x-served-by", self.name)]))
        return None


async def start_stale(upstreams, name: str = "up", **kw) -> tuple[StaleUpstream, Upstream]:
    script = StaleUpstream(name, **kw)
    up = await upstreams(http(script.app))
    return script, up


def config(*ups, attempts: int, **retry_kw):
    policy = RetryPolicy(attempts=attempts, backoff=FAST, **retry_kw)
    return mesh_config(
        {"svc": [u.address for u in ups]},
        destinations=[destination("svc", retry=policy, outlier=None)],
    )


async def get(sc) -> Result:
    return await call(outbound(sc), target="/r", timeout=TIMEOUT)


async def test_stale_resend_is_not_a_try(sidecars, upstreams) -> None:
    script, up = await start_stale(upstreams)
    sc = await sidecars(config(up, attempts=1))  # no retries at all
    first = await get(sc)
    assert (first.status, first.attempts) == (200, 1)
    second = await get(sc)  # takes the pooled connection the upstream closes
    assert (second.status, second.served_by) == (200, "up"), second.response.body
    assert second.attempts == 1  # the resend is not a try
    assert script.seen == [("up", False), ("up", True), ("up", False)]
    assert up.connections == 2


async def test_stale_resend_stays_on_the_same_endpoint(sidecars, upstreams) -> None:
    seen: list[tuple[str, bool]] = []
    _, up_a = await start_stale(upstreams, "a", seen=seen)
    _, up_b = await start_stale(upstreams, "b", seen=seen)
    sc = await sidecars(config(up_a, up_b, attempts=1))
    resends = 0
    for _ in range(8):
        before = len(seen)
        r = await get(sc)
        assert (r.status, r.attempts) == (200, 1)
        events = seen[before:]
        if events[0][1]:  # a stale pooled connection: resent on a fresh one, same endpoint
            resends += 1
            assert events == [(events[0][0], True), (events[0][0], False)]
        else:
            assert len(events) == 1
    assert resends >= 2


async def test_real_retry_still_happens_after_a_stale_resend(sidecars, upstreams) -> None:
    script, up = await start_stale(upstreams)
    sc = await sidecars(
        config(
            up,
            attempts=2,
            retry_on=frozenset({"retriable-status-codes"}),
            retriable_status_codes=frozenset({503}),
        )
    )
    assert (await get(sc)).status == 200
    script.statuses.append(503)  # the fresh connection's answer after the resend
    r = await get(sc)
    assert (r.status, r.served_by) == (200, "up"), r.response.body
    assert r.attempts == 2  # stale resend (not a try), 503 (try 1), retry (try 2)
    assert script.seen == [("up", False), ("up", True), ("up", False), ("up", False)]


async def test_two_stale_failures_in_a_row_end_as_an_error(sidecars, upstreams) -> None:
    """A broken pool is never walked: one resend per try, then a real failure."""
    script, up = await start_stale(upstreams, hold_until=3)
    sc = await sidecars(config(up, attempts=1))
    # Three connections in the pool, each of which the upstream will close on reuse.
    warm = await asyncio.wait_for(asyncio.gather(*(get(sc) for _ in range(3))), TIMEOUT)
    assert [r.status for r in warm] == [200] * 3
    await wait_for(lambda: len(sc.pools.by_address[up.address].idle) == 3, TIMEOUT)
    script.close_fresh = True
    before = len(script.seen)
    r = await get(sc)
    assert r.status == 502
    assert r.reason == Reason.UPSTREAM_RESET
    assert r.attempts == 1
    assert script.seen[before:] == [("up", True), ("up", False)]  # no third send
    # The sidecar is fine afterwards: the next stale connection is resent once.
    script.close_fresh = False
    ok = await get(sc)
    assert (ok.status, ok.attempts) == (200, 1)
