"""A byte tunnel between two connected transports: backpressure, half-close, reset.

Used after an HTTP `101 Switching Protocols` (WebSocket) and by the L4 proxy.
`splice(a, b)` hands both transports to two `_End` protocols; each end writes
what its transport reads into the other end's transport, unchanged and
uncopied (the bytes object from `data_received` goes straight to `write`).

Rules, per direction (say a -> b):
- Backpressure: when b's write buffer goes over its high-water mark
  (`pause_writing` on b's end), reading a is paused through a's ReadGate with
  reason PEER_BACKPRESSURE; `resume_writing` on b resumes it. So the tunnel
  holds at most b's high-water mark plus one read of a per direction.
- Half-close: EOF read from a becomes `b.write_eof()` if b can half-close
  (plain TCP), else `b.close()` (TLS); b -> a keeps flowing. When both
  directions have seen EOF, both transports are closed (after flushing).
- Reset: `connection_lost(exc)` with an error on a aborts b with SO_LINGER 0,
  so b's peer sees a reset too rather than a clean end it could mistake for a
  complete stream. `connection_lost(None)` (a was closed, not reset) closes b
  gracefully, flushing what is buffered for it.
- After EOF, reading a is never resumed again: both asyncio and uvloop stop
  reading on EOF, and restarting a reader on a finished stream would deliver
  EOF twice (asyncio) or is undefined (libuv).

`on_closed(bytes_a_to_b, bytes_b_to_a)` runs exactly once, when both ends
are closed. The counts include the pre-read bytes given to `splice`.

Idle timeout (`idle` > 0, the L4 proxy's `timeouts.tcp_idle`): once no byte
has been read from either transport for `idle` seconds, half-closed or not,
`on_idle` runs and both are closed (`close_idle`). Each read only stores the
loop time (`IdleTimeout.last`); the one timer per tunnel re-arms itself for
`last + idle` when it fires early, so it fires about once per `idle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

from lepton_mesh.proxy.flow import PEER_BACKPRESSURE, ReadGate

OnClosed = Callable[[int, int], None]
TunnelEnds = tuple[asyncio.Transport, asyncio.Transport]

# SO_LINGER on, timeout 0: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def splice(
    a: asyncio.Transport,
    b: asyncio.Transport,
    *,
    a_to_b: bytes = b"",
    b_to_a: bytes = b"",
    a_eof: bool = False,
    b_eof: bool = False,
    on_closed: OnClosed | None = None,
    idle: float = 0.0,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Pipe bytes between `a` and `b` until both are closed.

    `a_to_b` are bytes already read from a by its previous protocol, written to
    b before anything else (and `b_to_a` the reverse). `a_eof` says the
    previous protocol already read EOF from a (and returned True from
    `eof_received`), so it is forwarded at once and a is never read again.

    Handover invariants (the caller must keep them):
    - Call this from a loop callback or a task step with no await between
      the last read by the previous protocol and this call: `set_protocol`
      happens here, synchronously, so every byte is either in `a_to_b` /
      `b_to_a` or delivered to the tunnel, never lost or reordered.
    - From here on the tunnel alone pauses and resumes reading on a and b.
      Whatever reasons the previous owners had to pause reading are dropped:
      each transport is resumed unless its peer's write buffer is already
      over the high-water mark. That case is checked here because the
      transport told the previous protocol (`pause_writing`) and will not
      tell the tunnel again; the tunnel does get the `resume_writing`.
    - A transport already closing at handover may have delivered its
      `connection_lost` to the previous protocol: it counts as closed now,
      and its peer is closed gracefully after the pre-read bytes.
    """
    closing_a, closing_b = a.is_closing(), b.is_closing()
    ea = _End(a, on_closed, first=True)
    eb = _End(b, on_closed, first=False)
    ea.peer, eb.peer = eb, ea
    if idle > 0:

        def idle_timeout() -> None:
            if on_idle is not None:
                on_idle()
            close_idle(a)
            close_idle(b)

        ea.idle = eb.idle = IdleTimeout(asyncio.get_running_loop(), idle, idle_timeout)
    # Take the callbacks first, so that pause_writing caused by the pre-read
    # writes below reaches the tunnel.
    a.set_protocol(ea)
    b.set_protocol(eb)
    if a_to_b:
        ea.data_received(a_to_b)
    if b_to_a:
        eb.data_received(b_to_a)
    if a_eof:
        ea.eof_received()
    if b_eof:
        eb.eof_received()
    # on_closed is never called from inside splice: the caller may still be
    # setting up what it refers to.
    if closing_a:
        ea.lose(None, defer=True)
    if closing_b:
        eb.lose(None, defer=True)
    ea.take_reading()
    eb.take_reading()


class _End(asyncio.Protocol):
    """One transport of a tunnel; what it reads is written to `peer.transport`."""

    __slots__ = (
        "eof",
        "first",
        "gate",
        "idle",
        "lost",
        "nbytes",
        "on_closed",
        "peer",
        "transport",
    )

    peer: _End

    def __init__(
        self, transport: asyncio.Transport, on_closed: OnClosed | None, *, first: bool
    ) -> None:
        self.transport = transport
        self.first = first  # this is `a`: its count comes first in on_closed
        # The gate gets the transport only in take_reading(): until then the
        # reading state is the previous owner's, and a pause requested during
        # the handover is only recorded.
        self.gate = ReadGate()
        self.on_closed = on_closed
        self.eof = False  # EOF read from this transport
        self.lost = False  # this transport is closed (connection_lost or closing at handover)
        self.nbytes = 0  # bytes read here and written to the peer
        self.idle: IdleTimeout | None = None  # shared with the peer

    def take_reading(self) -> None:
        """Own the reading state from now on (see splice's handover invariants)."""
        t = self.transport
        if self.lost or self.eof or t.is_closing():
            return
        if _over_high_water(self.peer.transport):
            self.gate.pause(PEER_BACKPRESSURE)
        self.gate.attach(t)  # pauses if a reason is set
        if not self.gate.paused:
            t.resume_reading()  # idempotent; undoes a pause by the previous owner

    # --- asyncio.Protocol ---

    def data_received(self, data: bytes) -> None:
        idle = self.idle
        if idle is not None:
            idle.last = idle.now()
        peer = self.peer
        if peer.lost or peer.transport.is_closing():
            return  # the peer is gone or going; the reset/close reaches our side too
        self.nbytes += len(data)
        peer.transport.write(data)

    def eof_received(self) -> bool:
        # True keeps the transport open: the other direction may still be
        # flowing into it. The tunnel closes it itself when both are done.
        if self.eof or self.lost:
            return True
        self.eof = True
        peer = self.peer
        if peer.lost:
            return True
        pt = peer.transport
        if peer.eof:
            self.transport.close()
            pt.close()
        elif pt.can_write_eof():
            if not pt.is_closing():
                pt.write_eof()
        else:
            pt.close()
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if not peer.eof:
            peer.gate.pause(PEER_BACKPRESSURE)

    def resume_writing(self) -> None:
        peer = self.peer
        if not peer.eof:
            peer.gate.resume(PEER_BACKPRESSURE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(exc, defer=False)

    # --- tunnel ---

    def lose(self, exc: Exception | None, *, defer: bool) -> None:
        """This transport is closed: close (or reset) the peer, or finish."""
        if self.lost:
            return  # closing at handover already counted it
        self.lost = True
        peer = self.peer
        if not peer.lost:
            if exc is None:
                peer.transport.close()
            else:
                reset(peer.transport)
            return
        if self.idle is not None:
            self.idle.cancel()
        on_closed, self.on_closed, peer.on_closed = self.on_closed, None, None
        if on_closed is None:
            return
        a, b = (self, peer) if self.first else (peer, self)
        if defer:
            asyncio.get_running_loop().call_soon(on_closed, a.nbytes, b.nbytes)
        else:
            on_closed(a.nbytes, b.nbytes)


def _over_high_water(t: asyncio.Transport) -> bool:
    try:
        _low, high = t.get_write_buffer_limits()
    except NotImplementedError:
        return False
    return t.get_write_buffer_size() > high


class IdleTimeout:
    """Runs `on_idle` once `last` (the loop time of the latest read, stored by
    the tunnel's ends) is `seconds` old. One loop timer, re-armed when it
    fires early; a read costs the ends one float store."""

    __slots__ = ("_handle", "_loop", "_on_idle", "_seconds", "last", "now")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, on_idle: Callable[[], None]
    ) -> None:
        self._loop = loop
        self.now = loop.time
        self.last = loop.time()
        self._seconds = seconds
        self._on_idle = on_idle
        self._handle: asyncio.TimerHandle | None = loop.call_at(self.last + seconds, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        due = self.last + self._seconds
        if due > self.now():
            self._handle = self._loop.call_at(due, self._fire)
            return
        self._handle = None
        self._on_idle()


def close_idle(t: asyncio.Transport) -> None:
    """Close a transport of an idle tunnel as Envoy's tcp_proxy does: a clean
    close (FIN), since nothing was cut. Bytes still waiting to be written after
    `idle` without a read are not going anywhere (the peer stopped reading or
    vanished): then a reset, so the peer does not take the stream for complete
    and the transport does not wait forever to flush (closing already or not)."""
    if t.get_write_buffer_size():
        reset(t)
    elif not t.is_closing():
        t.close()


def reset(t: asyncio.Transport) -> None:
    """Abort `t` so that its peer sees a TCP reset, not a clean close."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    t.abort()
