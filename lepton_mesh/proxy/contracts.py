"""What each layer of the request path sees of the layer above it.

The request path is one-way: sidecar -> listeners -> downstream (client
connection) -> exchange -> routing / clusters / pool -> upstream. Callbacks
still flow back up (an exchange tells its client connection it is done, a
connection tells its listener it closed). Those callbacks are typed by the
small protocols here, so no module imports a module above it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lepton_mesh.policy.traffic import Backend
    from lepton_mesh.proxy.errors import ProxyError
    from lepton_mesh.proxy.flow import ReadGate
    from lepton_mesh.proxy.http.http1 import RequestFacts
    from lepton_mesh.proxy.outbound.clusters import Cluster
    from lepton_mesh.proxy.outbound.pool import Pools
    from lepton_mesh.proxy.outbound.routing import ServiceTarget
    from lepton_mesh.proxy.snapshot import Snapshot


class ListenerSide(Protocol):
    """What client connections and their exchanges need from their listener."""

    name: str
    reporter: str  # "source" (outbound) or "destination" (inbound), for metrics and logs
    loop: asyncio.AbstractEventLoop
    pools: Pools
    draining: bool
    peer_header: bytes  # pre-rendered x-lepton-peer line for requests we send (outbound)

    @property
    def snapshot(self) -> Snapshot: ...

    def route(self, snap: Snapshot, facts: RequestFacts) -> ServiceTarget: ...
    def cluster_for(self, snap: Snapshot, backend: Backend) -> Cluster: ...
    def record(self, ex: Any) -> None: ...  # a finished exchange -> metrics and access log
    def record_reject(
        self,
        err: ProxyError,
        method: bytes,
        authority: bytes,
        target: bytes,
        client: str,
        request_id: bytes,
    ) -> None: ...
    def connection_opened(self, conn: Any) -> bool: ...  # False: over the connection limit
    def connection_closed(self, conn: Any) -> None: ...
    def tunnel_opened(self, ends: Any = None) -> None: ...  # ends: the upgraded transports
    def tunnel_closed(self, ends: Any = None) -> None: ...
    def observe_mirror(self, service: str, outcome: str) -> None: ...


class ClientSide(Protocol):
    """What an exchange needs from the client connection it answers."""

    listener: ListenerSide
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    gate: ReadGate
    feeding: bool  # the client's parser is running: hold upstream writes until it returns
    write_paused: bool
    eof: bool
    client_ip: bytes
    client_ip_str: str

    def arm_deadline(self, seconds: float) -> None: ...  # the exchange's overall timeout
    def send(self, data: bytes) -> None: ...
    def send_many(self, frames: tuple[bytes, ...]) -> None: ...
    def exchange_done(self, ex: Any, abort: bool) -> None: ...
    def detach_for_tunnel(self) -> None: ...
    def continue_relayed(self, ex: Any) -> None: ...  # a 100 Continue went to the client
