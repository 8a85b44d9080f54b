"""Simulated sidecars: N lightweight clients of the control stream in one process.

Each client speaks the real stream protocol (`lepton_mesh.meshproto`): it
sends a hello (its own node id, one of `--services` services, an instance,
`dependencies: [svc-x]`), then acknowledges every snapshot it is sent, and
pings every few seconds like a sidecar. It validates nothing and routes
nothing: what is measured is the control daemon.

Run as `python -m bench.meshclients --port P --admin-port A --token-file F
--clients N`. It talks to the bench in lines, and waits for a `go` line on
stdin after each of the first three, so that the bench reads the daemon's
CPU and RSS exactly between the phases:

    CONNECTED {json}   every client registered and got its first snapshot
    APPLIED {json}     the propagation rounds are done
    CHURNED {json}     the registry churn is done
    RESULT {json}      everything measured (then it exits)

Propagation: each round applies, through the admin API, a new version of
the Route for `svc-x` that every client depends on (one header value,
`x-bench-round`, changes), then waits until every client has received a
snapshot whose Route carries the new value (the client ACKs it on
receipt). A client's latency is from just before the apply request was
sent to its receipt, so the apply itself (validation, the etcd transaction,
the watch) is inside it; the same from the apply's response is given too.
The daemon pushes before it answers the apply, so many of those are 0.

Churn: a batch of clients of service `churn` connect all at once (100 at a
time), and one observer client that depends on `churn` counts the
endpoints in its snapshots: registered per second is the batch over the
time until the observer sees all of them; removed per second, the batch
over the time from closing them until it sees none.

Receipt times are taken when this process reads a frame: with 1,000
clients on one event loop, the last one read includes this process's own
queueing (a few ms), which counts against the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import aiohttp
import uvloop

from lepton_mesh import meshproto as mp

CONNECTED = "CONNECTED "
APPLIED = "APPLIED "
CHURNED = "CHURNED "
RESULT = "RESULT "
GO = "go"

DEPENDENCY = "svc-x"
CHURN_SERVICE = "churn"
MARKER_HEADER = "x-bench-round"
NAMESPACE = "default"
_BATCH = 100  # streams opened at once: a burst, not a SYN flood
_PING_EVERY_S = 5.0  # as a sidecar does; control drops a stream silent for 15 s
_WAIT_S = 60.0  # any one wait for the daemon; past it the tool fails


class ToolError(Exception):
    """The daemon did not do what the run needs; the message says what."""


# --- pure helpers ----------------------------------------------------------------


def route(marker: str) -> dict[str, Any]:
    """The Route every client depends on; only `marker` changes between rounds."""
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "Route",
        "metadata": {"name": DEPENDENCY, "namespace": NAMESPACE},
        "spec": {
            "destination": DEPENDENCY,
            "rules": [
                {
                    "name": "all",
                    "backends": [{"service": DEPENDENCY}],
                    "request_headers": {"set": {MARKER_HEADER: marker}},
                }
            ],
        },
    }


def route_marker(policies: Iterable[Mapping[str, Any]]) -> str | None:
    """The `x-bench-round` value of the Route for svc-x in a snapshot's policies, if any."""
    for p in policies:
        spec = p.get("spec") or {}
        if p.get("kind") != "Route" or spec.get("destination") != DEPENDENCY:
            continue
        for rule in spec.get("rules") or ():
            value = ((rule.get("request_headers") or {}).get("set") or {}).get(MARKER_HEADER)
            if isinstance(value, str):
                return value
    return None


def endpoint_count(services: Mapping[str, Any], name: str) -> int:
    service = services.get(name) or {}
    return len(service.get("endpoints") or ())


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank, as the other clients of the bench compute it."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def latency_summary(seconds: Iterable[float], prefix: str = "") -> dict[str, float]:
    values = sorted(seconds)

    def ms(v: float) -> float:
        return round(v * 1000, 3)

    return {
        f"{prefix}p50_ms": ms(percentile(values, 50)),
        f"{prefix}p90_ms": ms(percentile(values, 90)),
        f"{prefix}p99_ms": ms(percentile(values, 99)),
        f"{prefix}max_ms": ms(values[-1]) if values else 0.0,
    }


def hello(node_id: str, service: str, port: int, dependencies: Sequence[str]) -> bytes:
    return mp.encode(
        mp.Hello(
            node_id=node_id,
            service=service,
            namespace=NAMESPACE,
            instance=mp.Instance(address="127.0.0.1", ports={"http": port}),
            dependencies=tuple(dependencies),
        )
    )


# --- the clients -----------------------------------------------------------------

OnSnapshot = Callable[["Client", mp.Snapshot, float], None]


class Client(asyncio.Protocol):
    """One simulated sidecar's stream: hello, then an ACK for every snapshot."""

    __slots__ = (
        "_decoder",
        "_hello",
        "_on_snapshot",
        "closed",
        "errors",
        "first_snapshot",
        "marker",
        "marker_at",
        "node_id",
        "transport",
        "version",
    )

    def __init__(self, node_id: str, hello_frame: bytes, on_snapshot: OnSnapshot) -> None:
        self.node_id = node_id
        self._hello = hello_frame
        self._on_snapshot = on_snapshot
        self._decoder = mp.FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.first_snapshot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.version = 0
        self.marker: str | None = None
        self.marker_at = 0.0
        self.errors: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._hello)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._decoder.feed(data)
        try:
            while (msg := self._decoder.next_message()) is not None:
                self._handle(msg, now)
        except mp.ProtocolError as exc:
            self._fail(f"protocol: {exc}")

    def _handle(self, msg: mp.Message, now: float) -> None:
        if isinstance(msg, mp.Snapshot):
            self.version = msg.version
            assert self.transport is not None
            self.transport.write(mp.encode(mp.Ack(msg.version)))
            self._on_snapshot(self, msg, now)
            if not self.first_snapshot.done():
                self.first_snapshot.set_result(None)
        elif isinstance(msg, mp.Error):
            self._fail(f"error from control: {msg.reason}: {msg.detail}")

    def _fail(self, why: str) -> None:
        self.errors.append(why)
        if not self.first_snapshot.done():
            self.first_snapshot.set_exception(ToolError(f"{self.node_id}: {why}"))
        if self.transport is not None:
            self.transport.close()

    def ping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mp.encode(mp.Ping(time.time())))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first_snapshot.done():
            self.first_snapshot.set_exception(ToolError(f"{self.node_id}: closed before welcome"))
        if not self.closed.done():
            self.closed.set_result(None)


class Fleet:
    """The clients, and the counters the waits watch (no per-snapshot scan of all clients)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.members: list[Client] = []
        self.awaited: str | None = None  # the marker of the round in progress
        self.marked = 0  # members that have the awaited marker
        self.all_marked = asyncio.Event()
        self.observed = 0  # churn endpoints in the observer's latest snapshot
        self.observed_changed = asyncio.Event()

    # snapshot callbacks (synchronous, on the event loop)

    def on_member_snapshot(self, client: Client, snap: mp.Snapshot, now: float) -> None:
        marker = route_marker(snap.policies)
        if marker == client.marker:
            return
        client.marker, client.marker_at = marker, now
        if marker is not None and marker == self.awaited:
            self.marked += 1
            if self.marked == len(self.members):
                self.all_marked.set()

    def on_observer_snapshot(self, _client: Client, snap: mp.Snapshot, _now: float) -> None:
        self.observed = endpoint_count(snap.services, CHURN_SERVICE)
        self.observed_changed.set()

    # connecting

    async def connect(
        self, node_id: str, frame: bytes, on_snapshot: OnSnapshot
    ) -> tuple[Client, float]:
        """One stream, once it has its first snapshot; and the seconds that took."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: Client(node_id, frame, on_snapshot), self.host, self.port
        )
        async with asyncio.timeout(_WAIT_S):
            await client.first_snapshot
        return client, time.perf_counter() - started

    async def connect_many(
        self, specs: Sequence[tuple[str, bytes]], on_snapshot: OnSnapshot
    ) -> list[Client]:
        out: list[Client] = []
        for first in range(0, len(specs), _BATCH):
            batch = specs[first : first + _BATCH]
            done = await asyncio.gather(*(self.connect(n, f, on_snapshot) for n, f in batch))
            out.extend(client for client, _ in done)
        return out

    async def wait_observed(self, count: int) -> None:
        async with asyncio.timeout(_WAIT_S):
            while self.observed != count:
                self.observed_changed.clear()
                await self.observed_changed.wait()

    def ping_all(self, clients: Iterable[Client]) -> None:
        for client in clients:
            client.ping()

    def errors(self) -> list[str]:
        return [f"{c.node_id}: {e}" for c in self.members for e in c.errors]


# --- the admin API ---------------------------------------------------------------


class Admin:
    def __init__(self, session: aiohttp.ClientSession, port: int, token: str) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.headers = {"Authorization": f"Bearer {token}"}

    async def apply(self, manifests: list[dict[str, Any]], message: str) -> dict[str, Any]:
        body = {"manifests": manifests, "message": message}
        async with self.session.post(
            f"{self.base}/policies:apply", json=body, headers=self.headers
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise ToolError(f"apply answered {resp.status}: {data}")
            return cast(dict[str, Any], data)

    async def applied_versions(self) -> dict[str, int]:
        async with self.session.get(f"{self.base}/sidecars", headers=self.headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise ToolError(f"GET sidecars answered {resp.status}: {data}")
        items = data.get("items", data) if isinstance(data, dict) else data
        return {s["node_id"]: int(s.get("applied_version") or 0) for s in items}


# --- the phases ------------------------------------------------------------------


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _say_and_wait(reader: asyncio.StreamReader, prefix: str, data: object) -> None:
    print(prefix + json.dumps(data), flush=True)
    line = (await reader.readline()).decode().strip()
    if line != GO:
        raise ToolError(f"expected {GO!r} on stdin, got {line!r}")


async def _ping_forever(fleet: Fleet, observer: Client) -> None:
    while True:
        await asyncio.sleep(_PING_EVERY_S)
        fleet.ping_all([*fleet.members, observer])


async def _acks_recorded(admin: Admin, fleet: Fleet, started: float) -> float:
    """Seconds from `started` until control's sidecar list shows every member's ACK."""
    want = {c.node_id: c.version for c in fleet.members}
    async with asyncio.timeout(_WAIT_S):
        while True:
            have = await admin.applied_versions()
            if all(have.get(node, 0) >= version for node, version in want.items()):
                return time.perf_counter() - started
            await asyncio.sleep(0.05)  # a poll interval: the list is control's, not ours


async def propagate(admin: Admin, fleet: Fleet, rounds: int) -> dict[str, Any]:
    from_apply: list[float] = []
    from_return: list[float] = []
    apply_ms, round_max_ms, acks_ms = [], [], []
    for r in range(1, rounds + 1):
        marker = f"round-{r}"
        fleet.awaited, fleet.marked = marker, 0
        fleet.all_marked.clear()
        started = time.perf_counter()
        await admin.apply([route(marker)], f"bench propagation round {r}")
        returned = time.perf_counter()
        try:
            async with asyncio.timeout(_WAIT_S):
                await fleet.all_marked.wait()
        except TimeoutError:
            raise ToolError(
                f"round {r}: {fleet.marked} of {len(fleet.members)} clients got the change "
                f"within {_WAIT_S:.0f}s"
            ) from None
        times = [c.marker_at for c in fleet.members]
        from_apply.extend(t - started for t in times)
        from_return.extend(max(0.0, t - returned) for t in times)
        apply_ms.append(round((returned - started) * 1000, 3))
        round_max_ms.append(round((max(times) - started) * 1000, 3))
        acks_ms.append(round(await _acks_recorded(admin, fleet, started) * 1000, 3))
    return {
        "rounds": rounds,
        **latency_summary(from_apply),
        **latency_summary(from_return, "from_return_"),
        "before_return": sum(1 for v in from_return if v == 0.0),
        "apply_ms": apply_ms,
        "round_max_ms": round_max_ms,
        "acks_recorded_ms": acks_ms,
    }


async def churn(fleet: Fleet, batch: int) -> dict[str, Any]:
    specs = [
        (f"churn-{i}", hello(f"churn-{i}", CHURN_SERVICE, 30000 + i, ())) for i in range(batch)
    ]
    started = time.perf_counter()
    clients = await fleet.connect_many(specs, lambda *_: None)
    await fleet.wait_observed(batch)
    registered = time.perf_counter() - started
    errors = [f"{c.node_id}: {e}" for c in clients for e in c.errors]
    closing = time.perf_counter()
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    await fleet.wait_observed(0)
    removed = time.perf_counter() - closing
    return {
        "batch": batch,
        "register_s": round(registered, 3),
        "remove_s": round(removed, 3),
        "registered_per_s": round(batch / registered, 1),
        "removed_per_s": round(batch / removed, 1),
        "errors": errors,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    token = Path(args.token_file).read_text().strip()
    fleet = Fleet(args.host, args.port)
    reader = await _stdin_lines()
    async with aiohttp.ClientSession() as session:
        admin = Admin(session, args.admin_port, token)
        await admin.apply([route("round-0")], "bench propagation: initial route")
        observer, _ = await fleet.connect(
            "bench-observer",
            hello("bench-observer", "bench-observer", 1024, (CHURN_SERVICE,)),
            fleet.on_observer_snapshot,
        )
        specs = [
            (
                f"bench-{i}",
                hello(f"bench-{i}", f"bench-c{i % args.services}", 1025 + i, (DEPENDENCY,)),
            )
            for i in range(args.clients)
        ]
        started = time.perf_counter()
        fleet.members = await fleet.connect_many(specs, fleet.on_member_snapshot)
        connect_s = time.perf_counter() - started
        pinger = asyncio.get_running_loop().create_task(_ping_forever(fleet, observer))
        try:
            connected = {
                "clients": args.clients,
                "services": args.services,
                "connect_s": round(connect_s, 3),
                "connected_per_s": round(args.clients / connect_s, 1),
            }
            await _say_and_wait(reader, CONNECTED, connected)
            propagation = await propagate(admin, fleet, args.rounds)
            await _say_and_wait(reader, APPLIED, propagation)
            churned = await churn(fleet, args.churn)
            await _say_and_wait(reader, CHURNED, churned)
        finally:
            pinger.cancel()
    errors = fleet.errors() + churned.pop("errors")
    for c in [*fleet.members, observer]:
        assert c.transport is not None
        c.transport.close()
    return {**connected, **propagation, "churn": churned, "errors": errors[:20]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.meshclients", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="control's sidecar-facing port")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--token-file", required=True, help="an admin token")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--services", type=int, default=10, help="clients are spread over these")
    p.add_argument("--rounds", type=int, default=5, help="applies measured")
    p.add_argument("--churn", type=int, default=100, help="clients connected and closed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = uvloop.run(main_async(args))
    except (ToolError, TimeoutError, OSError, aiohttp.ClientError) as exc:
        print(f"meshclients: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
