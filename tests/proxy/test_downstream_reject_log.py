"""Access-log lines of requests refused before they became exchanges: the same
time format as every other line, and the method, authority and path as far as
the request was read."""

from __future__ import annotations

import os
import re

import orjson
import pytest
from proxy_harness import client, outbound

from lepton_mesh.proxy.observe.access_log import AccessLog

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

CASES = [
    # (id, request bytes, status, method, authority, path)
    ("bad-header", b"GET /c?q=1 HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nBad header\r\n\r\n", 400, "GET", "svc", "/c?q=1"),
    ("no-method", b"\x01junk\r\n\r\n", 400, "", "", ""),
    ("over-limit", b"POST /up HTTP/1.1\r\nHost: Svc\r\nContent-Length: 5000\r\n\r\n", 413, "POST", "svc", "/up"),
    ("absolute-form", b"GET http://svc:80/p HTTP/1.1\r\nHost svc\r\n\r\n", 400, "GET", "svc:80", "/p"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case_id", "data", "status", "method", "authority", "path"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_reject_line_matches_exchange_lines(
    sidecars, echo, case_id, data, status, method, authority, path
) -> None:
    sc = await sidecars(services={"svc": echo.address}, limits={"max_body_bytes": 1000})
    r, w = os.pipe()
    with open(w, "wb") as stream:
        sc.access_log = AccessLog(True, stream, flush_interval=3600)
        async with client(outbound(sc)) as c:
            await c.send(data)
            assert (await c.response()).status == status
            assert await c.closed_by_peer()
        sc.access_log.close()
        sc.access_log = AccessLog(False)  # what the fixture's teardown closes
        line = orjson.loads(os.read(r, 1 << 16))
    os.close(r)
    assert TIME.match(line["time"]), line["time"]
    assert (line["method"], line["authority"], line["path"]) == (method, authority, path)
    assert (line["status"], line["reporter"]) == (status, "source")
    assert line["reason"] and line["detail"] and line["request_id"]
