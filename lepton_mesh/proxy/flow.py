"""Read backpressure shared by every connection the sidecar owns.

A transport's reading may be paused for several independent reasons at once
(the peer's write buffer is full, a pipelined request is waiting its turn, an
upstream connection is still being opened). Each reason is a bit; the
transport is paused while any bit is set and resumed only when all are clear,
so one party can never resume what another paused. Both calls are idempotent.
"""

from __future__ import annotations

import asyncio

# Why reading is paused. Bits, so several may hold at once.
PEER_BACKPRESSURE = 1  # the other side's transport asked us to stop (pause_writing)
PIPELINE = 2  # a request is queued behind the one in flight
BUFFERED = 4  # bytes are held for a peer that is not attached yet (connecting)


class ReadGate:
    __slots__ = ("_reasons", "_transport")

    def __init__(self, transport: asyncio.BaseTransport | None = None) -> None:
        self._transport = transport
        self._reasons = 0

    def attach(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._reasons:
            transport.pause_reading()  # type: ignore[attr-defined]

    @property
    def paused(self) -> bool:
        return self._reasons != 0

    def pause(self, reason: int) -> None:
        was = self._reasons
        self._reasons = was | reason
        if not was and self._transport is not None:
            t = self._transport
            if not t.is_closing():
                t.pause_reading()  # type: ignore[attr-defined]

    def resume(self, reason: int) -> None:
        was = self._reasons
        if not was & reason:
            return
        self._reasons = was & ~reason
        if not self._reasons and self._transport is not None:
            t = self._transport
            if not t.is_closing():
                t.resume_reading()  # type: ignore[attr-defined]
