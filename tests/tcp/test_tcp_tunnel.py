"""splice() over real sockets: data, handover cases, half-close, reset, close.

Topology in every test: remote A <-> a ==splice== b <-> remote B, where a and
b are transports owned by an `Owner` (the previous protocol) until the splice.
"""

from __future__ import annotations

import asyncio

import pytest
from tcp_support import DEADLINE, Servers, until

from lepton_mesh.proxy.l4.tunnel import splice

Closed = list[tuple[int, int]]


async def test_bytes_flow_both_ways_and_on_closed_counts_them(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    closed: Closed = []
    splice(a.t, b.t, on_closed=lambda x, y: closed.append((x, y)))

    ra.writer.write(b"ping")
    assert await rb.reader.readexactly(4) == b"ping"
    rb.writer.write(b"pong!")
    assert await ra.reader.readexactly(5) == b"pong!"

    ra.writer.write_eof()
    assert await rb.reader.read() == b""  # EOF forwarded
    rb.writer.write_eof()
    assert await ra.reader.read() == b""
    await until(lambda: closed, "on_closed")
    assert closed == [(4, 5)]
    assert a.t.is_closing() and b.t.is_closing()


async def test_pre_read_bytes_are_delivered_first(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    ra.writer.write(b"early-a")
    rb.writer.write(b"early-b")
    await until(lambda: a.data == b"early-a" and b.data == b"early-b", "owners read")
    closed: Closed = []
    splice(
        a.t,
        b.t,
        a_to_b=bytes(a.data),
        b_to_a=bytes(b.data),
        on_closed=lambda x, y: closed.append((x, y)),
    )
    ra.writer.write(b"+late")
    rb.writer.write(b"+late")
    assert await rb.reader.readexactly(12) == b"early-a+late"
    assert await ra.reader.readexactly(12) == b"early-b+late"
    ra.writer.close()
    rb.writer.close()
    await until(lambda: closed, "on_closed")
    assert closed == [(12, 12)]


async def test_reading_paused_by_previous_owner_is_resumed(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    a.t.pause_reading()
    b.t.pause_reading()
    assert not a.t.is_reading() and not b.t.is_reading()
    ra.writer.write(b"sent while paused")
    splice(a.t, b.t)
    assert a.t.is_reading() and b.t.is_reading()
    assert await rb.reader.readexactly(17) == b"sent while paused"
    rb.writer.write(b"back")
    assert await ra.reader.readexactly(4) == b"back"


async def test_peer_over_high_water_at_handover_pauses_reading_until_drained(
    servers: Servers,
) -> None:
    """b's buffer went over the mark while its old owner wrote: the old owner
    got pause_writing, the tunnel never will, so splice must see it itself."""
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    blob = bytes(range(256)) * (32 * 4096)  # 32 MiB: more than loopback socket buffers hold
    b.t.write(blob)  # rb does not read yet
    _low, high = b.t.get_write_buffer_limits()
    assert b.t.get_write_buffer_size() > high

    splice(a.t, b.t)
    assert not a.t.is_reading(), "a must stay paused while b is over its high-water mark"
    ra.writer.write(b"after")
    assert await rb.reader.readexactly(len(blob)) == blob
    assert await rb.reader.readexactly(5) == b"after"
    assert a.t.is_reading()


async def test_eof_already_read_by_previous_owner_is_forwarded(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    ra.writer.write(b"request")
    ra.writer.write_eof()
    await until(lambda: a.eof, "owner saw EOF")
    closed: Closed = []
    splice(a.t, b.t, a_to_b=bytes(a.data), a_eof=True, on_closed=lambda x, y: closed.append((x, y)))
    assert await rb.reader.read() == b"request"  # then EOF
    rb.writer.write(b"reply after the client's EOF")
    rb.writer.write_eof()
    assert await ra.reader.read() == b"reply after the client's EOF"
    await until(lambda: closed, "on_closed")
    assert closed == [(7, 28)]


async def test_transport_closing_at_handover_counts_as_closed(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    a.t.close()  # the old owner closed it; connection_lost may already be queued
    closed: Closed = []
    splice(a.t, b.t, a_to_b=b"last words", on_closed=lambda x, y: closed.append((x, y)))
    assert closed == [], "on_closed never runs inside splice"
    assert await rb.reader.read() == b"last words"  # flushed, then a clean close
    await until(lambda: closed, "on_closed")
    assert closed == [(10, 0)]
    assert await ra.reader.read() == b""


async def test_half_close_keeps_the_other_direction_flowing(servers: Servers) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    closed: Closed = []
    splice(a.t, b.t, on_closed=lambda x, y: closed.append((x, y)))
    ra.writer.write(b"question")
    ra.writer.write_eof()
    assert await rb.reader.read() == b"question"
    reply = b"r" * (4 << 20)
    rb.writer.write(reply)
    await rb.writer.drain()
    rb.writer.write_eof()
    assert await ra.reader.read() == reply
    await until(lambda: closed, "on_closed")
    assert closed == [(8, len(reply))]


@pytest.mark.parametrize("side", ["a", "b"])
async def test_reset_is_propagated_as_a_reset(servers: Servers, side: str) -> None:
    a, ra = await servers.pair()
    b, rb = await servers.pair()
    closed: Closed = []
    splice(a.t, b.t, on_closed=lambda x, y: closed.append((x, y)))
    ra.writer.write(b"x")
    assert await rb.reader.readexactly(1) == b"x"
    resetter, other = (ra, rb) if side == "a" else (rb, ra)
    resetter.reset()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(DEADLINE):
            await other.reader.read()
    await until(lambda: closed, "on_closed")
    assert closed == [(1, 0)]
