"""Keep-alive connection pools, one per upstream endpoint address.

Invariants:
- A connection is in `idle` only while nothing is bound to it and it has
  seen no byte and no EOF since it was released; `UpstreamConnection` drops
  itself (`forget`) the moment either happens, so a dead connection is never
  handed out, and never twice.
- `size` counts every connection the pool owns: idle, busy and being opened.
  It never exceeds `max_size`; a request that would exceed it is refused at
  once with 503 `overflow` (no unbounded queue).
- Idle connections are reused LIFO (the warmest first) and closed after
  `idle_timeout` by one timer per pool, armed only while some are idle.
- A pool whose `identity` is set opens mTLS connections (proxy/security/mtls.py): the
  peer must be a sidecar of the pool's service, checked before the connection
  is handed out. A connection verified under an older trust bundle is closed
  instead of returning to `idle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from typing import TYPE_CHECKING

from lepton_mesh.policy.sidecar_config import Address, PoolConfig
from lepton_mesh.proxy.errors import ProxyError, Reason, UpstreamError
from lepton_mesh.proxy.http.upstream import UpstreamConnection
from lepton_mesh.proxy.security.mtls import (
    UPSTREAM_IDENTITY_MISMATCH,
    MeshTlsError,
    open_mesh_connection,
)
from lepton_mesh.proxy.security.tls import HandshakeFailure

if TYPE_CHECKING:
    from lepton_mesh.proxy.resilience.circuit import CircuitBreaker
    from lepton_mesh.proxy.security.mtls import MeshIdentity


class EndpointPool:
    __slots__ = (
        "_loop",
        "_sweep",
        "address",
        "address_text",
        "busy",
        "connecting",
        "idle",
        "idle_timeout",
        "identity",
        "max_size",
        "service",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: Address,
        service: str,
        cfg: PoolConfig,
        identity: MeshIdentity | None = None,
    ) -> None:
        self._loop = loop
        self.address = address
        self.address_text = str(address)  # for every access-log line
        self.service = service
        self.identity = identity  # None: plaintext; else mTLS to a sidecar of `service`
        self.max_size = cfg.max_per_endpoint
        self.idle_timeout = cfg.idle_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.busy: set[UpstreamConnection] = set()
        self.connecting = 0
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                return conn
        return None

    async def open(
        self, timeout: float, breaker: CircuitBreaker | None = None
    ) -> UpstreamConnection:
        """A new connection, counted as busy (and in `breaker`'s connections while open).

        Raises ProxyError: overflow (pool or breaker full) or UpstreamError
        (connect failure, for retry decisions).
        """
        if breaker is not None and not breaker.can_open_connection():
            raise ProxyError(
                503, Reason.OVERFLOW, f"circuit breaker: max_connections to {self.service} reached"
            )
        if self.size >= self.max_size:
            raise ProxyError(
                503,
                Reason.OVERFLOW,
                f"connection pool for {self.address} is full ({self.max_size} connections)",
            )
        self.connecting += 1
        try:
            async with asyncio.timeout(timeout):
                if self.identity is None:
                    _, conn = await self._loop.create_connection(
                        lambda: UpstreamConnection(self), self.address.host, self.address.port
                    )
                else:
                    conn = await self._open_tls(self.identity)
        except MeshTlsError as exc:
            # Nothing was sent: as retriable as a refused connection.
            mismatch = exc.reason == HandshakeFailure.IDENTITY_MISMATCH
            raise UpstreamError(
                503,
                UPSTREAM_IDENTITY_MISMATCH if mismatch else Reason.UPSTREAM_CONNECT_FAILED,
                exc.detail,
                "connect_failure",
            ) from None
        except TimeoutError:
            raise UpstreamError(
                503,
                Reason.UPSTREAM_CONNECT_FAILED,
                f"connect to {self.address} timed out after {timeout:g}s",
                "connect_failure",
            ) from None
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED
            raise UpstreamError(
                503,
                Reason.UPSTREAM_CONNECT_FAILED,
                f"connect to {self.address} failed: {_os_reason(exc)}",
                "refused" if refused else "connect_failure",
            ) from None
        finally:
            self.connecting -= 1
        self.busy.add(conn)
        if breaker is not None:
            breaker.connection_opened()
            conn.breaker = breaker
        return conn

    async def _open_tls(self, identity: MeshIdentity) -> UpstreamConnection:
        _, conn, creds = await open_mesh_connection(
            identity, lambda: UpstreamConnection(self), self.address, self.service
        )
        conn.secured(identity, creds.http, creds.trust_generation)
        return conn  # type: ignore[return-value]

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange completed cleanly."""
        self.busy.discard(conn)
        if conn.closed:
            return
        tls = conn.tls
        if tls is not None and conn.trust_generation != tls.trust_generation():
            conn.close()  # verified under a bundle we no longer hold
            return
        conn.unbind()
        conn.idle_since = self._loop.time()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_later(self.idle_timeout, self._close_expired)

    def forget(self, conn: UpstreamConnection) -> None:
        """The connection closed or broke: it is no longer ours to hand out.
        Called once or more per connection; the breaker is told once."""
        if conn.breaker is not None:
            conn.breaker.connection_closed()
            conn.breaker = None
        if conn in self.busy:
            self.busy.discard(conn)
            return
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def detach(self, conn: UpstreamConnection) -> None:
        """The connection became a tunnel (after 101): it leaves the pool for good."""
        self.busy.discard(conn)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.idle) + list(self.busy):
            conn.close()

    def close_idle(self) -> None:
        for conn in list(self.idle):
            conn.close()

    def _close_expired(self) -> None:
        self._sweep = None
        cutoff = self._loop.time() - self.idle_timeout
        idle = self.idle
        while idle and idle[0].idle_since <= cutoff:
            idle.popleft().close()
        if idle:
            self._sweep = self._loop.call_at(
                idle[0].idle_since + self.idle_timeout, self._close_expired
            )


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED or isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc)


class Pools:
    """All endpoint pools of a sidecar, keyed by address; outlive config swaps.

    With an `identity`, a new pool speaks mTLS unless its address is in
    `plaintext` (mtls.plaintext_endpoints: the local app, endpoints without a
    sidecar); `reconfigure` re-decides for existing pools.
    """

    __slots__ = ("_loop", "by_address", "cfg", "identity", "plaintext")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cfg: PoolConfig,
        identity: MeshIdentity | None = None,
        plaintext: frozenset[Address] = frozenset(),
    ) -> None:
        self._loop = loop
        self.cfg = cfg
        self.identity = identity
        self.plaintext = plaintext
        self.by_address: dict[Address, EndpointPool] = {}

    def get(self, address: Address, service: str) -> EndpointPool:
        pool = self.by_address.get(address)
        if pool is None:
            pool = self.by_address[address] = EndpointPool(
                self._loop, address, service, self.cfg, self._identity_for(address)
            )
        return pool

    def _identity_for(self, address: Address) -> MeshIdentity | None:
        return None if address in self.plaintext else self.identity

    def reconfigure(
        self, cfg: PoolConfig, live: set[Address], plaintext: frozenset[Address] | None = None
    ) -> None:
        """Apply new pool limits; close idle connections to endpoints no longer
        configured, and to endpoints whose plaintext-or-mTLS decision changed."""
        self.cfg = cfg
        if plaintext is not None:
            self.plaintext = plaintext
        for address, pool in list(self.by_address.items()):
            pool.max_size = cfg.max_per_endpoint
            pool.idle_timeout = cfg.idle_timeout
            identity = self._identity_for(address)
            if pool.identity is not identity:
                pool.identity = identity
                pool.close_idle()
            if address not in live:
                pool.close_idle()
                if not pool.busy and not pool.connecting:
                    del self.by_address[address]

    def close_idle_tls(self) -> None:
        """The trust bundle changed: no idle mTLS connection verified under the old one stays."""
        for pool in self.by_address.values():
            if pool.identity is not None:
                pool.close_idle()

    def stats(self) -> list[tuple[str, str, int, int, int]]:
        return [
            (p.service, str(a), len(p.busy), len(p.idle), p.connecting)
            for a, p in self.by_address.items()
        ]

    def close(self) -> None:
        for pool in self.by_address.values():
            pool.close()
        self.by_address.clear()
