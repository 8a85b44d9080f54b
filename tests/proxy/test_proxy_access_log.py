"""The access log of a running sidecar: a finished exchange's line waits for its batch
without keeping the client connection alive, and says what happened; and its time format."""

from __future__ import annotations

import gc
import os

import orjson
import pytest
from proxy_harness import Upstream, client, get, outbound, wait_for

from lepton_mesh.proxy.http.downstream import DownstreamProtocol
from lepton_mesh.proxy.http.exchange import iso_time
from lepton_mesh.proxy.observe.access_log import AccessLog


def live_connections(listener: object) -> list[DownstreamProtocol]:
    """Every client-connection object of `listener` still in memory."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is DownstreamProtocol and o.listener is listener]


async def test_a_waiting_line_keeps_no_connection_alive(sidecars, echo: Upstream) -> None:
    sc = await sidecars(app=echo.address, services={"svc": echo.address})
    r, w = os.pipe()
    with open(w, "wb") as stream:
        # Lines leave only on flush(): the one below waits while its connection closes.
        sc.access_log = AccessLog(True, stream, flush_interval=3600)
        listener = sc.outbound
        async with client(outbound(sc)) as c:
            resp = await c.request(get("/v1/classify?x=1", headers=[("x-request-id", "rid-42")]))
            assert resp.status == 200
            assert len(live_connections(listener)) == 1
        await wait_for(lambda: not listener.connections, what="the connection to close")
        assert sc.access_log.held_bytes == 0  # the line has not been built yet...
        assert live_connections(listener) == [], "...and must not keep the connection alive"

        sc.access_log.close()
        sc.access_log = AccessLog(False)  # what the fixture's teardown closes
        line = orjson.loads(os.read(r, 1 << 16))
    os.close(r)
    assert line["request_id"] == "rid-42"
    assert (line["method"], line["authority"], line["path"]) == ("GET", "svc", "/v1/classify?x=1")
    assert (line["status"], line["reason"], line["reporter"]) == (200, "-", "source")
    assert line["upstream"] == str(echo.address) and line["backend"] == "svc"
    assert line["attempts"] == 1 and line["downstream"] == "127.0.0.1"
    assert 0 < line["upstream_ms"] <= line["duration_ms"]


@pytest.mark.parametrize(
    ("wall", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1.9995, "1970-01-01T00:00:01.999Z"),  # truncated, never rounded into the next second
        (1700000000.123456, "2023-11-14T22:13:20.123Z"),
        (1700000000.999, "2023-11-14T22:13:20.999Z"),
        (1700000001.0, "2023-11-14T22:13:21.000Z"),
        (1700000000.123456, "2023-11-14T22:13:20.123Z"),  # back to an earlier second
    ],
)
def test_iso_time(wall: float, text: str) -> None:
    assert iso_time(wall) == text
    assert iso_time(wall) == text  # the remembered millisecond gives the same text
