"""`lepton-mesh sidecar` alone (its app in another container): SIGTERM drains
inbound first and keeps outbound for the app until `timeouts.drain` ends;
`/quit` drains and exits at once (Jobs)."""

from __future__ import annotations

import asyncio
import http.client
import signal
import time

import pytest
from lifecycle_support import (
    LOCAL,
    Upstream,
    eventually,
    http_get,
    refuses,
    sidecar_config,
    start,
)

from tests.support.ports import free_port
from tests.support.signals import not_ignored

DRAIN = 2.0  # seconds: long enough for the checks below to run inside it


async def _ready(admin: int) -> bool:
    try:
        return (await asyncio.to_thread(http_get, admin, "/ready"))[0] == 200
    except OSError:
        return False


def _call(conn: http.client.HTTPConnection) -> tuple[int, str, str | None]:
    conn.request("GET", "/", headers={"Host": "up"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode(), resp.getheader("connection")


async def test_sigterm_keeps_outbound_for_the_drain_period(tmp_path) -> None:
    up = await Upstream().start()
    admin, inbound, outbound = free_port(), free_port(), free_port()
    cfg = sidecar_config(
        tmp_path,
        app_port=free_port(),
        admin_port=admin,
        inbound_port=inbound,
        outbound_port=outbound,
        drain=f"{DRAIN}s",
        services={"up": [up.address]},
    )
    sidecar = await start("sidecar", "--config", str(cfg))
    kept = http.client.HTTPConnection(LOCAL, outbound, timeout=5)
    try:
        await eventually(lambda: _ready(admin), "the sidecar to be ready")
        assert await asyncio.to_thread(_call, kept) == (200, "up", None)
        sent = time.monotonic()
        sidecar.send(signal.SIGTERM)

        async def draining() -> bool:
            status, body = await asyncio.to_thread(http_get, admin, "/ready")
            return status == 503 and '"draining"' in body

        await eventually(draining, "/ready to say draining")
        assert refuses(inbound)
        # The app's kept-alive connection and a new one both still work, and stay open.
        assert await asyncio.to_thread(_call, kept) == (200, "up", None)
        fresh = http.client.HTTPConnection(LOCAL, outbound, timeout=5)
        try:
            assert await asyncio.to_thread(_call, fresh) == (200, "up", None)
        finally:
            fresh.close()
        assert time.monotonic() - sent < DRAIN, "the checks ran past the drain period"
        assert await sidecar.wait() == 0
        took = time.monotonic() - sent
        assert DRAIN <= took < DRAIN + 3.0, f"exited {took:.2f}s after SIGTERM"
        assert refuses(outbound) and refuses(admin)
    finally:
        kept.close()
        await sidecar.close()
        await up.stop()


def _post_quit(admin: int) -> None:
    conn = http.client.HTTPConnection(LOCAL, admin, timeout=5)
    conn.request("POST", "/quit")
    assert conn.getresponse().status == 202
    conn.close()


async def test_sigquit_dumps_every_threads_stack_and_keeps_serving(tmp_path) -> None:
    admin = free_port()
    cfg = sidecar_config(tmp_path, app_port=free_port(), admin_port=admin)
    with not_ignored(signal.SIGQUIT):  # as in a terminal, not as in a background job
        sidecar = await start("sidecar", "--config", str(cfg))
    try:
        await eventually(lambda: _ready(admin), "the sidecar to be ready")
        for _ in range(2):  # a handler that ran once still runs
            sidecar.send(signal.SIGQUIT)
            await eventually(lambda: _ready(admin), "the sidecar to answer after SIGQUIT")
        _post_quit(admin)
        assert await sidecar.wait() == 0  # not killed by the signal's default action
        err = sidecar.stderr.decode(errors="replace")
        assert err.count("(most recent call first)") >= 2, err  # one dump per signal
        assert "lepton_mesh/proxy/sidecar.py" in err, err
    finally:
        await sidecar.close()


@pytest.mark.parametrize("how", ["/quit", "SIGINT", "SIGHUP"])
async def test_quit_drains_and_exits_at_once(tmp_path, how: str) -> None:
    """`/quit`, Ctrl-C, or the terminal going away (SIGHUP) drain with no
    outbound grace: exit 0 at once, never a kill by a signal's default action."""
    admin = free_port()
    cfg = sidecar_config(tmp_path, app_port=free_port(), admin_port=admin, drain="20s")
    sidecar = await start("sidecar", "--config", str(cfg))
    try:
        await eventually(lambda: _ready(admin), "the sidecar to be ready")
        sent = time.monotonic()
        if how == "/quit":
            _post_quit(admin)
        else:
            sidecar.send(getattr(signal, how))
        assert await sidecar.wait() == 0
        assert time.monotonic() - sent < 2.0
    finally:
        await sidecar.close()
