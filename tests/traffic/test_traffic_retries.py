"""Retries, end to end: another endpoint, which failures, which methods, how many tries,
per-try and overall timeouts.

Outlier detection is off in these tests (`outlier=None`) so that a failing
endpoint keeps being picked and every retry decision is exercised; ejection
has its own tests.
"""

from __future__ import annotations

import time

import pytest
from proxy_harness import (
    LOCAL,
    Address,
    RawClient,
    assert_lepton_error,
    chunked_body,
    client,
    free_port,
    outbound,
    response_bytes,
    wait_for,
)
from traffic_support import (
    CLOSE,
    HOLD,
    OK,
    RESET,
    STATUS,
    TIMER_SLACK,
    Backend,
    CapturedLog,
    Result,
    call,
    clusters,
    destination,
    drive,
    mesh_config,
    metric,
    route,
    scrape,
    start_backend,
    start_backends,
)

from lepton_mesh.policy.traffic import Backoff, RetryPolicy, RouteRule
from lepton_mesh.proxy.errors import Reason

FAST = Backoff(base=0.001, max=0.004)  # keeps retried requests quick; jitter is still exercised
DEFAULT_ON = frozenset({"connect-failure", "refused", "reset"})


def retry(attempts: int = 2, retry_on: frozenset[str] = DEFAULT_ON, **kw) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, retry_on=retry_on, backoff=FAST, **kw)


def dead_address() -> Address:
    """An address that refuses connections (nothing listens there)."""
    return Address(LOCAL, free_port())


# --------------------------------------------------------------------------
# A failing endpoint among three: retries land on another one.


@pytest.mark.parametrize(
    ("failure", "retry_on"),
    [
        ("reset", DEFAULT_ON),  # reads the request, then RST
        ("close", DEFAULT_ON),  # reads the request, then FIN, no response
        ("refuse", DEFAULT_ON),  # nothing listens
        ("503", frozenset({"5xx"})),
    ],
)
async def test_retry_reaches_another_endpoint(sidecars, upstreams, failure, retry_on) -> None:
    good = await start_backends(upstreams, "good-1", "good-2")
    bad: Backend | None = None
    if failure == "refuse":
        bad_address = dead_address()
    else:
        mode = {"reset": RESET, "close": CLOSE, "503": STATUS}[failure]
        bad = await start_backend(upstreams, "bad", mode, status=503)
        bad_address = bad.address
    cfg = mesh_config(
        {"svc": [*good, bad_address]},
        destinations=[destination("svc", retry=retry(2, retry_on), outlier=None)],
    )
    sc = await sidecars(cfg)
    log = CapturedLog(sc)

    n = 90
    results = await drive(outbound(sc), n, concurrency=4)

    assert [r.status for r in results] == [200] * n
    assert {r.served_by for r in results} <= {"good-1", "good-2"}
    retried = [r for r in results if r.attempts == 2]
    assert {r.attempts for r in results} <= {1, 2}
    # Seeded balancers: the failing endpoint is some requests' first pick (about a third).
    assert 10 <= len(retried) <= 50, len(retried)
    # Each request reached an app exactly once where it succeeded.
    assert sum(b.hits for b in good) == n
    if bad is not None:
        # Every try the failing endpoint took was retried, once, as the same
        # request: same target, same request id and trace context.
        assert bad.hits == len(retried)
        served = {r.target: r for g in good for r in g.requests}
        for tried in bad.requests:
            again = served[tried.target]
            for name in ("x-request-id", "traceparent"):
                assert tried.get(name) == again.get(name) is not None

    by_path = {rec["path"]: rec for rec in log.records()}
    for i, r in enumerate(results):
        rec = by_path[f"/r{i}"]
        assert (rec["status"], rec["attempts"]) == (200, r.attempts)
        assert rec["upstream"] in {str(g.address) for g in good}

    samples = await scrape(sc)
    assert metric(
        samples, "lepton_retries_total", destination_service="svc", outcome="attempted"
    ) == len(retried)
    assert (
        metric(
            samples, "lepton_retries_total", destination_service="svc", outcome="budget_exhausted"
        )
        == 0
    )
    budget = (await clusters(sc))["svc"]["retry_budget"]
    assert (budget["requests_total"], budget["retries_total"]) == (n, len(retried))


# --------------------------------------------------------------------------
# Methods: what may have reached the app is retried only if idempotent.


@pytest.mark.parametrize(
    ("method", "retriable_methods", "expected_hits"),
    [
        ("POST", frozenset(), 1),  # reached the app: never again
        ("PATCH", frozenset(), 1),
        ("POST", frozenset({"POST"}), 2),  # unless the policy says POST may repeat
        ("GET", frozenset(), 2),
        ("PUT", frozenset(), 2),  # idempotent (RFC 9110 9.2.2)
        ("DELETE", frozenset(), 2),
    ],
)
async def test_request_that_reached_the_app_is_retried_only_if_idempotent(
    sidecars, upstreams, method, retriable_methods, expected_hits
) -> None:
    """Both endpoints read the whole request, then reset: the app may have acted on it."""
    backends = await start_backends(upstreams, "a", "b", mode=RESET)
    cfg = mesh_config(
        {"svc": backends},
        destinations=[
            destination("svc", retry=retry(2, retriable_methods=retriable_methods), outlier=None)
        ],
    )
    sc = await sidecars(cfg)
    log = CapturedLog(sc)

    result = await call(outbound(sc), method, "/order", body=b'{"item": 7}')

    assert_lepton_error(result.response, 502, Reason.UPSTREAM_RESET)
    assert sum(b.hits for b in backends) == expected_hits
    for b in backends:
        for req in b.requests:
            assert (req.method, req.body) == (method, b'{"item": 7}')
    if expected_hits == 2:
        assert [b.hits for b in backends] == [1, 1]  # the retry went to the other endpoint
    (rec,) = log.records()
    assert (rec["status"], rec["reason"], rec["attempts"]) == (502, "upstream_reset", expected_hits)


async def test_post_whose_connection_was_refused_is_retried(sidecars, upstreams) -> None:
    """A refused connection never reached the app: any method is safe to send again."""
    good = await start_backend(upstreams, "good")
    cfg = mesh_config(
        {"svc": [dead_address(), good]},
        destinations=[destination("svc", retry=retry(2), outlier=None)],
    )
    sc = await sidecars(cfg)
    n = 24
    results = await drive(
        outbound(sc),
        n,
        concurrency=1,
        method="POST",
        make=lambda i: (
            f"POST /order/{i} HTTP/1.1\r\nHost: svc\r\nContent-Length: 9\r\n\r\nitem={i:04d}"
        ).encode(),
    )
    assert [r.status for r in results] == [200] * n
    assert good.hits == n  # each POST reached the app exactly once
    assert [req.body for req in good.requests] == [f"item={i:04d}".encode() for i in range(n)]
    refused_first = [r for r in results if r.attempts == 2]
    assert 4 <= len(refused_first) <= 20, len(refused_first)
    assert {r.attempts for r in results} == {1, 2}


# --------------------------------------------------------------------------
# Which statuses are retried.


@pytest.mark.parametrize(
    ("retry_on", "codes", "bad_status", "retried"),
    [
        (frozenset({"retriable-status-codes"}), frozenset({409}), 409, True),
        (frozenset({"retriable-status-codes"}), frozenset({409}), 429, False),
        (frozenset({"retriable-status-codes"}), frozenset({409}), 503, False),
        (frozenset({"gateway-error"}), frozenset(), 502, True),
        (frozenset({"gateway-error"}), frozenset(), 503, True),
        (frozenset({"gateway-error"}), frozenset(), 504, True),
        (frozenset({"gateway-error"}), frozenset(), 500, False),
        (frozenset({"5xx"}), frozenset(), 500, True),
        (frozenset({"5xx"}), frozenset(), 409, False),
        (DEFAULT_ON, frozenset(), 503, False),  # the default retries failures, not answers
    ],
)
async def test_retriable_statuses(
    sidecars, upstreams, retry_on, codes, bad_status, retried
) -> None:
    good = await start_backend(upstreams, "good")
    bad = await start_backend(upstreams, "bad", STATUS, status=bad_status)
    policy = retry(2, retry_on, retriable_status_codes=codes)
    cfg = mesh_config(
        {"svc": [good, bad]}, destinations=[destination("svc", retry=policy, outlier=None)]
    )
    sc = await sidecars(cfg)
    n = 40
    results = await drive(outbound(sc), n, concurrency=2)

    assert bad.hits > 0
    assert good.hits + bad.hits == n + (bad.hits if retried else 0)
    if retried:
        assert [r.status for r in results] == [200] * n
        assert sum(r.attempts == 2 for r in results) == bad.hits
    else:
        assert sorted({r.status for r in results}) == [200, bad_status]
        assert sum(r.status == bad_status for r in results) == bad.hits
        assert {r.attempts for r in results} == {1}
        # The upstream's own answer, passed through: not a sidecar error.
        assert all(r.served_by == "bad" for r in results if r.status == bad_status)


# --------------------------------------------------------------------------
# How many tries.


@pytest.mark.parametrize("attempts", [1, 2, 3, 5])
async def test_retries_honor_attempts_on_a_failing_status(sidecars, upstreams, attempts) -> None:
    """The last try's answer goes to the client, with the count of tries."""
    bad = await start_backend(upstreams, "bad", STATUS, status=503)
    cfg = mesh_config(
        {"svc": [bad]},
        destinations=[destination("svc", retry=retry(attempts, frozenset({"5xx"})), outlier=None)],
    )
    sc = await sidecars(cfg)
    result = await call(outbound(sc))
    assert (result.status, result.served_by, result.attempts) == (503, "bad", attempts)
    assert result.reason is None  # the attempts ran out, not the budget
    assert bad.hits == attempts
    assert (await clusters(sc))["svc"]["retry_budget"]["retries_total"] == attempts - 1


@pytest.mark.parametrize("attempts", [1, 2, 4])
async def test_retries_honor_attempts_on_resets(sidecars, upstreams, attempts) -> None:
    bad = await start_backend(upstreams, "bad", RESET)
    cfg = mesh_config(
        {"svc": [bad]}, destinations=[destination("svc", retry=retry(attempts), outlier=None)]
    )
    sc = await sidecars(cfg)
    log = CapturedLog(sc)
    result = await call(outbound(sc))
    assert_lepton_error(result.response, 502, Reason.UPSTREAM_RESET)
    assert bad.hits == attempts
    (rec,) = log.records()
    assert rec["attempts"] == attempts


async def test_sidecar_error_after_several_tries_says_how_many(sidecars, upstreams) -> None:
    """`x-lepton-attempts` says how many tries a request took: also when every
    try failed and the sidecar answers with its own error."""
    bad = await start_backend(upstreams, "bad", RESET)
    cfg = mesh_config(
        {"svc": [bad]}, destinations=[destination("svc", retry=retry(3), outlier=None)]
    )
    sc = await sidecars(cfg)
    result = await call(outbound(sc))
    assert_lepton_error(result.response, 502, Reason.UPSTREAM_RESET)
    assert bad.hits == 3
    assert result.response.get("x-lepton-attempts") == "3"


# --------------------------------------------------------------------------
# Timeouts.


async def test_per_try_timeout_then_success_on_another_endpoint(sidecars, upstreams) -> None:
    """A hanging endpoint costs one per-try timeout, then the retry answers."""
    per_try = 0.15
    hang = await start_backend(upstreams, "hang", HOLD)  # never released
    good = await start_backend(upstreams, "good")
    policy = retry(2, per_try_timeout=per_try)  # `reset` covers a per-try timeout (as Envoy)
    cfg = mesh_config(
        {"svc": [hang, good]},
        destinations=[destination("svc", retry=policy, timeout=5.0, outlier=None)],
    )
    sc = await sidecars(cfg)
    results = await drive(outbound(sc), 10, concurrency=1)

    assert [r.status for r in results] == [200] * 10
    assert {r.served_by for r in results} == {"good"}
    slow = [r for r in results if r.attempts == 2]
    assert len(slow) == hang.hits > 0
    for r in results:
        if r.attempts == 2:
            assert per_try - TIMER_SLACK <= r.latency < per_try + 0.25, r.latency
        else:
            assert r.latency < per_try, r.latency


@pytest.mark.parametrize(
    ("rule_timeout", "policy_timeout", "per_try", "attempts"),
    [
        (0.3, 60.0, 0.0, 1),  # the rule's timeout
        (None, 0.3, 0.0, 1),  # no rule timeout: the destination policy's
        (0.3, 60.0, 0.12, 5),  # retries stop when the whole request's time is up
    ],
)
async def test_overall_timeout_answers_504(
    sidecars, upstreams, rule_timeout, policy_timeout, per_try, attempts
) -> None:
    hang = await start_backend(upstreams, "hang", HOLD)
    policy = retry(attempts, per_try_timeout=per_try)
    rule = RouteRule(name="slow", timeout=rule_timeout, retry=policy)
    cfg = mesh_config(
        {"svc": [hang]},
        routes=[route("svc", rule)],
        destinations=[destination("svc", timeout=policy_timeout, outlier=None)],
    )
    sc = await sidecars(cfg)
    result = await call(outbound(sc))
    assert_lepton_error(result.response, 504, Reason.UPSTREAM_TIMEOUT)
    assert 0.3 - TIMER_SLACK <= result.latency < 0.3 + 0.2, result.latency
    if per_try:
        assert 2 <= hang.hits < attempts  # 0.3 s holds two or three 0.12 s tries, not five
    else:
        assert hang.hits == 1


async def test_ok_backend_needs_no_retry(sidecars, upstreams) -> None:
    """Baseline: healthy endpoints answer in one try, and the header says so."""
    backends = await start_backends(upstreams, "a", "b", mode=OK)
    sc = await sidecars(mesh_config({"svc": backends}))
    results = await drive(outbound(sc), 20, concurrency=2)
    assert {(r.status, r.attempts) for r in results} == {(200, 1)}


# --------------------------------------------------------------------------
# Bodies: replayed on a retry up to 64 KiB, beyond that not retried.


@pytest.mark.parametrize(
    ("size", "expected_hits"),
    [(10 * 1024, 2), (64 * 1024, 2), (64 * 1024 + 1, 1), (200 * 1024, 1)],
)
async def test_only_replayable_bodies_are_retried(sidecars, upstreams, size, expected_hits) -> None:
    """PUT is idempotent; both endpoints read the whole body, then reset."""
    backends = await start_backends(upstreams, "a", "b", mode=RESET)
    cfg = mesh_config(
        {"svc": backends}, destinations=[destination("svc", retry=retry(2), outlier=None)]
    )
    sc = await sidecars(cfg)
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    result = await call(outbound(sc), "PUT", "/blob", body=body)
    assert_lepton_error(result.response, 502, Reason.UPSTREAM_RESET)
    assert sum(b.hits for b in backends) == expected_hits
    assert all(req.body == body for b in backends for req in b.requests)


async def test_chunked_body_is_replayed_on_the_retry(sidecars, upstreams) -> None:
    """A chunked POST whose first connection was refused reaches the app whole
    (chunks and trailers) on the second try."""
    good = await start_backend(upstreams, "good")
    cfg = mesh_config(
        {"svc": [dead_address(), good]},
        destinations=[destination("svc", retry=retry(2), outlier=None)],
    )
    sc = await sidecars(cfg)
    chunks = [b"alpha-", b"beta-", b"gamma"]
    payload = chunked_body(chunks, trailers=[("x-checksum", "abc")])
    results = []
    for i in range(8):
        head = f"POST /c{i} HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
        async with client(outbound(sc)) as c:
            start = time.perf_counter()
            resp = await c.request(head.encode() + b"\r\n" + payload, "POST")
            results.append(Result(i, resp, time.perf_counter() - start))
    assert [r.status for r in results] == [200] * 8
    assert good.hits == 8
    for req in good.requests:
        assert (req.body, req.chunked, req.trailers) == (
            b"alpha-beta-gamma",
            True,
            [("x-checksum", "abc")],
        )
    assert {r.attempts for r in results} == {1, 2}


async def test_body_growing_past_the_replay_limit_during_backoff_is_replayed_whole(
    sidecars, upstreams, monkeypatch
) -> None:
    """The first try fails early (a 503 before the app read the body) and a retry
    is granted; while it waits for its backoff the client sends the rest of a
    body larger than the replay buffer. The retry must carry the whole body:
    dropping the held copy then sent the retry without the body's start (a
    truncated chunked body looks complete to the app), and left the client
    paused for good."""
    from lepton_mesh.proxy.http import exchange as exchange_module

    size = 3 * exchange_module.REPLAY_LIMIT
    seen: list[bytes] = []

    async def handler(conn) -> None:  # type: ignore[no-untyped-def]
        if not seen:
            seen.append(b"")  # first try: answer before reading the body
            await conn.read_request(body=False)
            await conn.send(response_bytes(503, b"busy", [("connection", "close")]))
            return
        req = await conn.read_request()
        seen.append(req.body)
        await conn.send(response_bytes(200, b"ok"))

    up = await upstreams(handler)
    cfg = mesh_config(
        {"svc": [up.address]},
        destinations=[destination("svc", retry=retry(2, frozenset({"5xx"})), outlier=None)],
    )
    sc = await sidecars(cfg)
    held: list[exchange_module.Exchange] = []
    again = exchange_module.Exchange._again
    monkeypatch.setattr(exchange_module.Exchange, "_again", lambda ex: held.append(ex))

    body = bytes(i % 251 for i in range(size))
    c = await RawClient.connect(outbound(sc))
    try:
        head = f"PUT /big HTTP/1.1\r\nHost: svc\r\nContent-Length: {size}\r\n\r\n".encode()
        await c.send(head + body[:1000])
        await wait_for(lambda: bool(held), what="the retry waiting for its backoff")
        c.writer.write(body[1000:])  # more than the sidecar holds: it pauses reading
        ex = held[0]
        await wait_for(lambda: ex.req_bytes > exchange_module.REPLAY_LIMIT, what="body past limit")
        again(ex)  # the backoff ends
        resp = await c.response("PUT", timeout=5.0)
    finally:
        await c.close()
    assert (resp.status, resp.get("x-lepton-attempts")) == (200, "2")
    assert seen[1] == body
