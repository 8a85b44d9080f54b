"""The push server and registry against a real etcd, with protocol peers on real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from pathlib import Path

import orjson
import pytest

from lepton_mesh import meshproto as mp
from lepton_mesh.control.auth import TokenIssuer, init_key
from lepton_mesh.control.store import Store
from lepton_mesh.identity.store import init_ca
from tests.control.conftest import Peer, Replicas, endpoints, eventually, hello
from tests.control.test_policy_push import SUBSETS, route

INSTANCE = "/lepton/v1/instances/default/{}/{}"


async def test_hello_registers_with_a_lease_and_close_removes_it_at_once(
    replicas: Replicas, store: Store
) -> None:
    replica = await replicas(lease_ttl=10)
    peer = await Peer.connect(replica.listen_port, hello("chat", "chat-1", port=15100))
    welcome = await peer.recv()
    assert welcome == mp.Welcome(control_id=replica.options.replica_id)
    snap = await peer.next_snapshot()
    assert snap.services == {} and snap.policies == ()
    assert snap.version > 0

    kv = await store.get(INSTANCE.format("chat", "chat-1"))
    assert kv is not None and kv.lease != 0
    assert 0 < await store.lease_ttl(kv.lease) <= 10
    value = orjson.loads(kv.value)
    assert {k: value[k] for k in ("address", "ports", "healthy", "draining", "node_id")} == {
        "address": "127.0.0.1",
        "ports": {"http": 15100},
        "healthy": True,
        "draining": False,
        "node_id": "chat-1",
    }
    status = await store.get("/lepton/v1/sidecars/chat-1")
    assert status is not None and status.lease == kv.lease

    started = time.monotonic()
    await peer.close()

    async def gone() -> bool:
        return await store.get(INSTANCE.format("chat", "chat-1")) is None

    await eventually(gone, timeout=2.0, what="instance removed on close")
    assert time.monotonic() - started < 2.0  # revoked, not left to the 10 s TTL
    assert await store.get("/lepton/v1/sidecars/chat-1") is None


@pytest.mark.timeout(20)
async def test_close_waits_for_its_tasks_without_spinning_on_finished_ones(
    replicas: Replicas,
) -> None:
    """Python 3.12+: gather() of finished tasks does not yield to the loop, so a
    loop waiting for the task set to empty spun forever (a SIGTERM never ended)."""
    replica = await replicas()
    assert replica.ctx is not None
    push = replica.ctx.push
    ran = asyncio.Event()

    async def quick() -> None:
        ran.set()

    push.spawn(quick())
    await asyncio.sleep(0)  # quick() has finished; its done callback has not run yet
    assert ran.is_set()
    await push.close()  # a spin never yields: only the timeout marker can end it


async def test_a_dependency_registering_appears_in_the_callers_next_snapshot(
    replicas: Replicas,
) -> None:
    replica = await replicas()
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    assert chat.snapshot is not None
    assert chat.snapshot.services == {"intent": {"protocol": "http", "endpoints": []}}

    started = time.monotonic()
    intent = await Peer.join(replica.listen_port, hello("intent", port=15106, labels={"v": "1"}))
    snap = await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))
    elapsed = time.monotonic() - started
    assert endpoints(snap, "intent") == [
        {"address": "127.0.0.1:15106", "weight": 1, "labels": {"v": "1"}, "healthy": True}
    ]
    assert elapsed < 2.0
    print(f"register -> caller's snapshot: {elapsed * 1000:.1f} ms")

    await intent.close()
    snap = await chat.next_snapshot(lambda s: not endpoints(s, "intent"))
    assert snap.services["intent"]["endpoints"] == []


async def test_scoping_a_sidecar_gets_only_its_dependencies(
    replicas: Replicas, store: Store
) -> None:
    replica = await replicas()
    route = {
        "apiVersion": "lepton-mesh/v1",
        "kind": "Route",
        "metadata": {"name": "billing", "namespace": "default"},
        "spec": {"destination": "billing", "rules": [{}]},
    }
    await store.put("/lepton/v1/policies/Route/default/billing", orjson.dumps(route))
    for svc in ("intent", "billing", "dialog"):
        await Peer.join(replica.listen_port, hello(svc))
    await Peer.join(replica.listen_port, hello("intent", namespace="other"))
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    assert chat.snapshot is not None
    assert set(chat.snapshot.services) == {"intent"}
    assert len(endpoints(chat.snapshot, "intent")) == 1  # not the other namespace's
    assert chat.snapshot.policies == ()

    star = await Peer.join(replica.listen_port, hello("ops", deps=("*",)))
    assert star.snapshot is not None
    assert set(star.snapshot.services) == {"intent", "billing", "dialog", "chat", "ops"}
    assert [p["kind"] for p in star.snapshot.policies] == ["Route"]


async def test_health_and_draining_mark_the_endpoint_for_callers(replicas: Replicas) -> None:
    replica = await replicas()
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    intent = await Peer.join(replica.listen_port, hello("intent"))
    await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))

    intent.send(mp.Health(False, "GET /healthz: 500"))
    snap = await chat.next_snapshot()
    assert [ep["healthy"] for ep in endpoints(snap, "intent")] == [False]

    intent.send(mp.Health(True))
    snap = await chat.next_snapshot()
    assert [ep["healthy"] for ep in endpoints(snap, "intent")] == [True]

    intent.send(mp.Draining())
    snap = await chat.next_snapshot()
    assert [ep["healthy"] for ep in endpoints(snap, "intent")] == [False]
    await intent.ping()  # still connected and served while draining


async def test_ack_and_nack_are_recorded_in_the_sidecar_status(replicas: Replicas) -> None:
    replica = await replicas()
    assert replica.ctx is not None
    registry = replica.ctx.registry
    peer = await Peer.join(replica.listen_port, hello("chat", "chat-7"))
    assert peer.snapshot is not None
    version = peer.snapshot.version

    def status() -> dict:
        rows = [s for s in registry.sidecars() if s["node_id"] == "chat-7"]
        return rows[0] if rows else {}

    await eventually(lambda: status().get("control") == replica.options.replica_id)
    assert status()["applied_version"] == 0 and status()["last_nack"] is None
    peer.send(mp.Ack(version))
    await eventually(lambda: status().get("applied_version") == version, what="ack recorded")
    peer.send(mp.Nack(version + 1, "policies[0].spec: bad"))
    await eventually(lambda: status().get("last_nack") is not None, what="nack recorded")
    assert status()["last_nack"] == {"version": version + 1, "error": "policies[0].spec: bad"}
    assert status()["applied_version"] == version
    # A later snapshot applied: the NACK is over (not counted as a sidecar with a NACK).
    peer.send(mp.Ack(version + 2))
    await eventually(lambda: status().get("applied_version") == version + 2, what="ack recorded")
    assert status()["last_nack"] is None


async def test_unchanged_content_is_not_pushed_again(replicas: Replicas) -> None:
    replica = await replicas()
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    await Peer.join(replica.listen_port, hello("billing"))  # outside chat's scope
    chat.send(mp.Ack(1))  # a status write: a new revision, nothing in scope
    await Peer.join(replica.listen_port, hello("intent"))
    snap = await chat.next_snapshot()
    # The first snapshot after the join is the one with intent: nothing came in between.
    assert len(endpoints(snap, "intent")) == 1
    assert len(chat.snapshots) == 2


async def test_bad_hellos_are_refused_with_an_error(replicas: Replicas) -> None:
    replica = await replicas()
    cases = [
        (mp.Ping(1.0), mp.Reason.UNEXPECTED_MESSAGE),
        (hello("chat", protocol=2), mp.Reason.UNSUPPORTED_VERSION),
        (hello("Chat"), mp.Reason.BAD_HELLO),
        (hello("chat", node_id="a/b"), mp.Reason.BAD_HELLO),
        (hello("chat", deps=("x y",)), mp.Reason.BAD_HELLO),
    ]
    for first, reason in cases:
        peer = await Peer.connect(replica.listen_port, first)  # type: ignore[arg-type]
        msg = await peer.recv()
        assert isinstance(msg, mp.Error) and msg.reason == reason, (first, msg)
        assert await peer.recv() is None  # closed after the error
    # Broken framing: a frame announced larger than the limit.
    peer = await Peer.connect(replica.listen_port)
    peer.writer.write((mp.MAX_FRAME + 1).to_bytes(4, "big"))
    msg = await peer.recv()
    assert isinstance(msg, mp.Error) and msg.reason == mp.Reason.FRAME_TOO_LARGE


async def test_a_silent_stream_is_dropped_and_deregistered(
    replicas: Replicas, store: Store
) -> None:
    replica = await replicas(idle_timeout=0.5)
    peer = await Peer.join(replica.listen_port, hello("chat", "quiet-1"))
    await peer.ping()
    msg = await peer.recv(timeout=3.0)
    assert isinstance(msg, mp.Error) and msg.reason == "idle_timeout"
    assert await peer.recv() is None

    async def gone() -> bool:
        return await store.get(INSTANCE.format("chat", "quiet-1")) is None

    await eventually(gone, what="instance removed")


async def test_a_second_stream_for_one_node_supersedes_the_first(
    replicas: Replicas, store: Store
) -> None:
    one, two = await replicas(), await replicas()
    first = await Peer.join(one.listen_port, hello("chat", "chat-9"))
    second = await Peer.join(two.listen_port, hello("chat", "chat-9"))
    kv = await store.get(INSTANCE.format("chat", "chat-9"))
    assert kv is not None
    # The old replica's next write finds the keys bound to another lease: it lets go.
    first.send(mp.Health(False))
    msg = await first.recv()
    assert isinstance(msg, mp.Error) and msg.reason == "superseded"
    await second.ping()
    after = await store.get(INSTANCE.format("chat", "chat-9"))
    assert after is not None and after.lease == kv.lease  # the new owner's lease still holds
    assert orjson.loads(after.value)["healthy"] is True  # and the old one did not write


async def test_sidecars_with_one_scope_share_one_build_per_revision(replicas: Replicas) -> None:
    replica = await replicas()
    assert replica.ctx is not None
    push = replica.ctx.push
    callers = [
        await Peer.join(replica.listen_port, hello("chat", deps=("intent",))) for _ in range(20)
    ] + [await Peer.join(replica.listen_port, hello("ops", deps=("dialog",))) for _ in range(20)]
    assert push.groups() == 2 + 0  # chat's and ops's scopes (the callers' own)
    builds, pushes = push.builds, push.pushes
    await Peer.join(replica.listen_port, hello("intent"))
    for peer in callers[:20]:
        await peer.next_snapshot(lambda s: bool(endpoints(s, "intent")))
    # intent's own (new) group, and chat's rebuilt once for all 20; ops's untouched.
    assert push.builds - builds == 2
    assert push.pushes - pushes == 20 + 1  # chat's callers, and intent's first snapshot


async def test_keys_deleted_behind_the_registrys_back_are_written_again(
    replicas: Replicas, store: Store
) -> None:
    replica = await replicas()
    peer = await Peer.join(replica.listen_port, hello("chat", "chat-5"))
    key = INSTANCE.format("chat", "chat-5")
    before = await store.get(key)
    assert before is not None
    await store.delete(key)  # e.g. an operator with etcdctl
    peer.send(mp.Health(False))  # the next write finds the key gone and re-creates it

    async def back() -> bool:
        kv = await store.get(key)
        return kv is not None and orjson.loads(kv.value)["healthy"] is False

    await eventually(back, what="instance re-created")
    kv = await store.get(key)
    assert kv is not None and kv.lease == before.lease
    await peer.ping()  # not mistaken for a takeover: the stream stays


async def test_a_node_id_held_by_another_service_is_refused_and_the_holder_stays(
    replicas: Replicas, store: Store
) -> None:
    one, two = await replicas(), await replicas()
    intent = await Peer.join(one.listen_port, hello("intent", "intent-1"))
    before = await store.get("/lepton/v1/sidecars/intent-1")
    assert before is not None
    # On the holder's replica (its local registration says who holds it), and on
    # another one (the status key in etcd says it).
    for replica in (one, two):
        impostor = await Peer.connect(replica.listen_port, hello("chat", "intent-1"))
        msg = await impostor.recv()
        assert isinstance(msg, mp.Error) and msg.reason == mp.Reason.NODE_ID_TAKEN, msg
        assert "default/intent" in msg.detail
        assert await impostor.recv() is None
    await intent.ping()  # not superseded
    after = await store.get("/lepton/v1/sidecars/intent-1")
    assert after is not None and after.lease == before.lease
    assert orjson.loads(after.value)["service"] == "intent"
    assert await store.get(INSTANCE.format("intent", "intent-1")) is not None
    assert await store.get(INSTANCE.format("chat", "intent-1")) is None
    # The same service reconnecting still takes its node_id over.
    again = await Peer.join(two.listen_port, hello("intent", "intent-1"))
    intent.send(mp.Health(False))
    msg = await intent.recv()
    assert isinstance(msg, mp.Error) and msg.reason == "superseded"
    await again.ping()


async def test_a_hello_whose_instance_callers_would_refuse_is_a_bad_hello(
    replicas: Replicas, store: Store
) -> None:
    """One such instance would make every caller's sidecar NACK every snapshot."""
    replica = await replicas()
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    cases = {
        "not an address!!/x:y": mp.Instance("not an address!!/x:y", {"http": 15006}),
        "100 kB address": mp.Instance("a" * 100_000, {"http": 15006}),
        "wildcard": mp.Instance("0.0.0.0", {"http": 15006}),
        "label value": mp.Instance("127.0.0.1", {"http": 15006}, {"v": "x" * 100_000}),
        "label name": mp.Instance("127.0.0.1", {"http": 15006}, {"a\nb": "1"}),
        "many labels": mp.Instance("127.0.0.1", {"http": 1}, {f"l{i}": "v" for i in range(100)}),
        "port name": mp.Instance("127.0.0.1", {"HTTP/1": 15006}),
    }
    for case, inst in cases.items():
        bad = mp.Hello("intent-x", "intent", "default", inst, dependencies=())
        peer = await Peer.connect(replica.listen_port, bad)
        msg = await peer.recv()
        assert isinstance(msg, mp.Error) and msg.reason == mp.Reason.BAD_HELLO, (case, msg)
        assert len(msg.detail) < 1000, case
        assert await peer.recv() is None
    assert (await store.get_prefix("/lepton/v1/instances/default/intent/"))[0] == []
    # The callers' config still flows: a good intent shows up at once.
    await Peer.join(replica.listen_port, hello("intent"))
    snap = await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))
    assert [ep["address"] for ep in endpoints(snap, "intent")] == ["127.0.0.1:15006"]


async def test_a_frozen_tls_sidecar_is_deregistered_when_its_stream_is_declared_dead(
    replicas: Replicas, store: Store, tmp_path: Path
) -> None:
    """Not ~30 s later, when closing the TLS connection gives up waiting for the peer."""
    ca = init_ca(tmp_path / "certs")
    issuer = TokenIssuer(init_key(tmp_path / "token.key"))
    replica = await replicas(
        ca_dir=str(ca.directory), token_key=str(tmp_path / "token.key"), idle_timeout=0.5
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.load_verify_locations(cadata=ca.bundle.read_text())
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.listen_port, ssl=tls)
    peer = Peer(reader, writer)
    Peer.opened.append(peer)
    token = issuer.create(subject="chat", role="join", ttl=600, service="chat")
    peer.send(dataclasses.replace(hello("chat", "frozen-1"), token=token))
    assert isinstance(await peer.recv(), mp.Welcome)
    await peer.next_snapshot()
    assert await store.get(INSTANCE.format("chat", "frozen-1")) is not None
    # Frozen (as with SIGSTOP): it sends nothing and reads nothing, a TLS close_notify included.
    writer.transport.pause_reading()
    frozen = time.monotonic()

    async def gone() -> bool:
        return await store.get(INSTANCE.format("chat", "frozen-1")) is None

    await eventually(gone, timeout=4.0, what="the frozen sidecar deregistered")
    assert time.monotonic() - frozen < 4.0  # idle timeout (0.5 s), then a revoke
    assert await store.get("/lepton/v1/sidecars/frozen-1") is None


async def test_a_peer_that_sends_pings_and_never_reads_is_not_buffered_without_bound(
    replicas: Replicas,
) -> None:
    """Real backpressure: while the peer does not read our pongs, we stop reading its pings."""
    replica = await replicas()
    assert replica.ctx is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up soon
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", replica.listen_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    peer = Peer(reader, writer)
    Peer.opened.append(peer)
    peer.send(hello("chat", "greedy-1"))
    assert isinstance(await peer.recv(), mp.Welcome)
    await peer.next_snapshot()
    (stream,) = replica.ctx.push._streams
    writer.transport.pause_reading()  # it never reads again
    pings = mp.encode(mp.Ping(1.5)) * 200_000  # ~6 MB, answered by as many bytes of pongs
    writer.write(pings)
    await eventually(lambda: not stream._transport.is_reading(), what="reading paused")
    sent = len(pings)
    buffered = stream._transport.get_write_buffer_size()
    assert buffered < sent // 4, (buffered, sent)  # without backpressure: ~all of it
    # Once it reads again, the stream goes on: every ping is answered.
    expected = 200_000 * len(mp.encode(mp.Pong(1.5)))
    received = [0]

    async def read_all() -> None:
        while received[0] < expected and (data := await reader.read(1 << 20)):
            received[0] += len(data)

    writer.transport.resume_reading()
    async with asyncio.timeout(20):
        await read_all()
    assert received[0] == expected
    assert stream in replica.ctx.push._streams and stream._transport.is_reading()


async def test_a_burst_of_applies_is_coalesced_into_a_few_pushes(replicas: Replicas) -> None:
    """100 route changes in a burst: each caller gets a handful of snapshots (one per
    push interval), the last one with the final content, not 100."""
    replica = await replicas(min_push_interval=0.2)
    ctx = replica.ctx
    assert ctx is not None
    callers = [
        await Peer.join(replica.listen_port, hello("chat", f"chat-{i}", deps=("dialog",)))
        for i in range(5)
    ]
    await ctx.policies.apply([SUBSETS], who="test", message="subsets")
    for peer in callers:
        await peer.next_snapshot(lambda s: len(s.policies) == 1)
    pushes = ctx.push.pushes
    started = time.monotonic()
    for n in range(100):
        await ctx.policies.apply([route(n)], who="test", message=f"burst {n}")
    elapsed = time.monotonic() - started
    for peer in callers:
        await peer.next_snapshot(
            lambda s: len(s.policies) == 2 and s.policies[1]["spec"] == route(99)["spec"]
        )
    per_caller = (ctx.push.pushes - pushes) / len(callers)
    # One at the start, then at most one per interval, and one at the end.
    assert per_caller <= elapsed / 0.2 + 2, (per_caller, elapsed)
    assert per_caller < 100
