"""What the sidecar accepts from an upstream and how it frames it for the client.

Each upstream here is a raw socket server whose bytes the test writes.
"""

from __future__ import annotations

import pytest
from proxy_harness import (
    client,
    get,
    http,
    outbound,
    response_bytes,
)

pytestmark = pytest.mark.timeout(30)


# -- Content-Length on responses without a body -----------------------------------


async def test_content_length_dropped_on_204_and_1xx_kept_on_304(sidecars, upstreams) -> None:
    async def app(req, conn) -> bool | None:
        if req.target == "/204":
            await conn.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nfirst")
        elif req.target == "/103":
            await conn.send(
                b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\nLink: </a>\r\n\r\n"
                + response_bytes(200, b"final")
            )
        elif req.target == "/304":
            await conn.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
        else:
            await conn.send(response_bytes(200, b"genuine"))
        return None

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        no_content = await c.request(get("/204"))
        assert no_content.status == 204
        assert not no_content.has("content-length")
        # The stray bytes made that upstream connection unusable: not served, not retried.
        after = await c.request(get("/after"))
        assert (after.status, after.body) == (200, b"genuine")
        hinted = await c.request(get("/103"))
        assert (hinted.status, hinted.body) == (200, b"final")
        assert [m.status for m in hinted.informational] == [103]
        assert not hinted.informational[0].has("content-length")
        not_modified = await c.request(get("/304"))
        assert (not_modified.status, not_modified.get("content-length")) == (304, "5")
    assert [r.target for r in up.requests] == ["/204", "/after", "/103", "/304"]
