"""The sidecar's side of the control stream, against a protocol peer on a real socket,
with real upstreams and real requests through the sidecar."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat

import orjson
import pytest
from control_support import (
    FAST,
    admin_get,
    call,
    control_config,
    named,
    route,
    snapshot,
    wait_for,
)
from proxy_harness import LOCAL, free_port

from lepton_mesh import meshproto as mp
from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.proxy.mesh.control_client import LKG_FILE, ControlTiming, backoff_delay


async def test_hello_names_the_instance_and_its_dependencies(sidecars, peers) -> None:
    peer = await peers()
    cfg = control_config(
        [peer.address],
        app=Address(LOCAL, free_port()),
        namespace="team-a",
        dependencies=["intent", "dialog"],
        instance={"id": "chat-1", "labels": {"version": "v1", "zone": "a"}, "weight": 3},
    )
    sc = await sidecars(cfg)
    conn = await peer.wait_connected()
    assert conn.received[0] == mp.Hello(
        node_id="chat-1",
        service="chat",
        namespace="team-a",
        instance=mp.Instance(
            address=LOCAL,  # the inbound listener's host
            ports={"http": sc.addresses["inbound"].port},  # the port actually bound
            # Without mTLS on its inbound port, callers with mTLS must speak plaintext to it.
            labels={"version": "v1", "zone": "a", "lepton.io/tls": "disabled"},
            weight=3,
        ),
        dependencies=("intent", "dialog"),
        applied_version=0,
        token=None,
        protocol=mp.PROTOCOL_VERSION,
    )


async def test_default_instance_id_and_wildcard_inbound(sidecars, peers) -> None:
    peer = await peers()
    cfg = control_config(
        [peer.address],
        app=Address(LOCAL, free_port()),
        listeners={"outbound": f"{LOCAL}:0", "inbound": "0.0.0.0:0", "admin": f"{LOCAL}:0"},
        dependencies=["*"],
    )
    await sidecars(cfg)
    hello = (await peer.wait_connected()).received[0]
    assert hello.node_id.startswith("chat-") and len(hello.node_id) == len("chat-") + 8
    assert hello.instance.address == "127.0.0.1"
    assert hello.dependencies == ("*",)


async def test_snapshot_is_applied_acked_and_routes_real_requests(
    sidecars, peers, upstreams
) -> None:
    a = await upstreams(named("a"))
    b = await upstreams(named("b"))
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}))
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))

    assert await peer.wait_message(mp.Ack) == mp.Ack(5)
    assert (await call(sc, "intent")).body == b"a"
    ready = await admin_get(sc, "/ready")
    assert ready.status == 200

    # The next snapshot replaces services and policies: a Route now sends
    # `intent` calls to `intent-b`.
    peer.conn.send(
        snapshot(6, {"intent": [a.address], "intent-b": [b.address]}, [route("intent", "intent-b")])
    )
    assert await peer.wait_message(mp.Ack, 2) == mp.Ack(6)
    assert (await call(sc, "intent")).body == b"b"
    assert sc.control.applied_version == 6

    config = (await admin_get(sc, "/config")).json()
    assert config["source"] == "snapshot 6"
    assert set(config["services"]) == {"intent", "intent-b"}
    assert [p["kind"] for p in config["policies"]] == ["Route"]
    status = config["control_status"]
    assert status["applied_version"] == 6
    assert status["connected"] is True
    assert status["control_id"] == "control-a"
    assert status["address"] == str(peer.address)


async def test_not_ready_until_the_first_snapshot(sidecars, peers, upstreams) -> None:
    a = await upstreams(named("a"))
    peer = await peers()  # welcomes, sends nothing
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    await peer.wait_connected()
    resp = await admin_get(sc, "/ready")
    assert resp.status == 503
    assert resp.json()["reason"] == "waiting for the first snapshot from control"
    peer.conn.send(snapshot(1, {"intent": [a.address]}))
    await peer.wait_message(mp.Ack)
    assert (await admin_get(sc, "/ready")).status == 200


async def test_invalid_snapshot_is_nacked_and_the_old_config_keeps_serving(
    sidecars, peers, upstreams
) -> None:
    a = await upstreams(named("a"))
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}))
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    await peer.wait_message(mp.Ack)

    bad = mp.Snapshot(
        6,
        {
            "intent": {
                "protocol": "http",
                "endpoints": [{"address": "nowhere", "weight": 1, "labels": {}, "healthy": True}],
            },
        },
        (route("intent", "missing"),),
    )
    peer.conn.send(bad)
    nack = await peer.wait_message(mp.Nack)
    assert nack == mp.Nack(
        6,
        "snapshot 6: services.intent.endpoints[0].address: invalid address 'nowhere': "
        "missing ':port'\n"
        "snapshot 6: policies: Route 'intent' (snapshot 6) sends 'intent' calls to "
        "'missing', which is not in services",
    )
    assert (await call(sc, "intent")).body == b"a"
    assert sc.control.applied_version == 5
    status = (await admin_get(sc, "/config")).json()["control_status"]
    assert status["last_nack"] == {"version": 6, "error": nack.error}
    assert status["applied_version"] == 5
    # and the stream goes on: the next good snapshot is applied
    peer.conn.send(snapshot(7, {"intent": [a.address]}))
    assert await peer.wait_message(mp.Ack, 2) == mp.Ack(7)


async def test_tcp_services_keep_the_local_listen_from_the_file(sidecars, peers, upstreams) -> None:
    a = await upstreams(named("a"))
    listen = f"{LOCAL}:{free_port()}"
    tcp = {"protocol": "tcp", "endpoints": [{"address": str(a.address)}]}
    peer = await peers(snapshot=snapshot(3, {"redis": tcp, "memcache": tcp}))
    cfg = control_config(
        [peer.address],
        app=Address(LOCAL, free_port()),
        services={"redis": {"protocol": "tcp", "listen": listen, "endpoints": []}},
    )
    sc = await sidecars(cfg)
    await peer.wait_message(mp.Ack)
    redis = sc.cfg.services["redis"]
    assert (str(redis.listen), redis.endpoints[0].address) == (listen, a.address)
    assert "memcache" not in sc.cfg.services  # no local port to offer the app
    assert sc.control.skipped_services == ("memcache",)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (5, 3.2), (6, 5.0), (60, 5.0), (10_000, 5.0)],
)
def test_backoff_is_exponential_with_full_jitter(failures: int, expected: float) -> None:
    timing = ControlTiming()
    assert backoff_delay(failures, timing, lambda: 1.0) == pytest.approx(expected)
    assert backoff_delay(failures, timing, lambda: 0.0) == 0.0
    assert backoff_delay(failures, timing, lambda: 0.5) == pytest.approx(expected / 2)


async def test_reconnects_to_the_next_address_when_the_first_dies(
    sidecars, peers, upstreams
) -> None:
    a = await upstreams(named("a"))
    b = await upstreams(named("b"))
    first = await peers("control-a", snapshot=snapshot(5, {"intent": [a.address]}))
    second = await peers("control-b", snapshot=snapshot(9, {"intent": [b.address]}))
    cfg = control_config([first.address, second.address], app=Address(LOCAL, free_port()))
    sc = await sidecars(cfg, _rng=lambda: 1.0)  # the longest delay full jitter allows
    await first.wait_message(mp.Ack)
    assert (await call(sc, "intent")).body == b"a"

    await first.stop()
    hello = (await second.wait_connected()).received[0]
    assert hello.applied_version == 5  # the new replica knows what this sidecar runs
    assert await second.wait_message(mp.Ack) == mp.Ack(9)
    assert (await call(sc, "intent")).body == b"b"
    assert sc.control.control_id == "control-b"
    assert sc.control.next_delay == pytest.approx(FAST.backoff_base * 2)  # one failure
    assert "control at" in sc.control.last_error


async def test_a_superseded_stream_waits_the_longest_delay_and_names_the_node_id(
    sidecars, peers
) -> None:
    """Two sidecars with one instance.id take each other's place on every reconnect."""
    peer = await peers()
    cfg = control_config([peer.address], app=Address(LOCAL, free_port()), instance={"id": "chat-1"})
    sc = await sidecars(cfg, _rng=lambda: 1.0)  # the longest delay full jitter allows
    first = await peer.wait_connected()
    await wait_for(lambda: sc.control.connected, what="welcomed")
    first.send(mp.Error(mp.Reason.SUPERSEDED, "this sidecar registered again on another stream"))
    await peer.wait_connected(2)  # it comes back, after the longest delay
    assert sc.control.next_delay == pytest.approx(FAST.backoff_max)
    assert "superseded" in sc.control.last_error
    assert "node_id 'chat-1'" in sc.control.last_error and "instance.id" in sc.control.last_error
    gap = peer.conns[1].opened_at - first.opened_at
    assert gap >= FAST.backoff_max * 0.9, gap
    # A failure of another kind after a good stream starts from the shortest delay again.
    await wait_for(lambda: sc.control.connected, what="welcomed again")
    peer.conn.transport.close()
    await peer.wait_connected(3)
    assert sc.control.next_delay == pytest.approx(FAST.backoff_base * 2)


async def test_backoff_grows_and_alternates_addresses_while_none_answers(sidecars, peers) -> None:
    first = await peers("control-a", hang_up=True)
    second = await peers("control-b", hang_up=True)
    timing = ControlTiming(
        backoff_base=0.025, backoff_max=0.2, ping_interval=0.1, silence_timeout=1
    )
    cfg = control_config([first.address, second.address], app=Address(LOCAL, free_port()))
    sc = await sidecars(cfg, timing=timing, _rng=lambda: 1.0)  # the longest delay jitter allows
    await wait_for(lambda: len(first.conns) + len(second.conns) >= 6, what="six attempts")
    conns = sorted(first.conns + second.conns, key=lambda c: c.opened_at)[:6]
    assert [c.peer for c in conns] == [first, second] * 3  # each attempt on the next address
    gaps = [b.opened_at - a.opened_at for a, b in itertools.pairwise(conns)]
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert delay * 0.9 <= gap < delay + 0.15, (gaps, delay)
    assert "before Welcome" in sc.control.last_error
    assert not sc.ready


@pytest.mark.timeout(20)
async def test_close_waits_out_a_finished_write_whose_callback_has_not_run(
    sidecars, peers, upstreams, tmp_path
) -> None:
    """Awaiting a finished future does not yield: close() spun forever on one."""
    a = await upstreams(named("a"))
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}))
    cfg = control_config([peer.address], app=Address(LOCAL, free_port()), state_dir=str(tmp_path))
    sc = await sidecars(cfg)
    client = sc.control
    await wait_for(lambda: client.persisted_version == 5, what="snapshot 5 on disk")
    # A write that has just finished: its done callback is scheduled, not run yet.
    finished = asyncio.get_running_loop().create_future()
    client._writing = finished
    finished.add_done_callback(lambda f: client._written(f, 6))
    finished.set_result(None)
    # Awaited directly: a task around it would start after that callback. A spin
    # never yields, so only the timeout marker can end it.
    await client.aclose()
    assert client._writing is None and client.persisted_version == 6


async def test_last_known_good_is_written_atomically(sidecars, peers, upstreams, tmp_path) -> None:
    a = await upstreams(named("a"))
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}, [route("intent", "intent")]))
    state = tmp_path / "state"
    cfg = control_config([peer.address], app=Address(LOCAL, free_port()), state_dir=str(state))
    sc = await sidecars(cfg)
    await wait_for(lambda: sc.control.persisted_version == 5, what="snapshot 5 on disk")
    path = state / LKG_FILE
    doc = orjson.loads(path.read_bytes())
    assert doc["format"] == 1
    assert (doc["service"], doc["namespace"], doc["control_id"]) == ("chat", "default", "control-a")
    assert mp.message_from_json(doc["snapshot"]) == snapshot(
        5, {"intent": [a.address]}, [route("intent", "intent")]
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(state) == [LKG_FILE]  # no temp file left behind

    peer.conn.send(snapshot(6, {"intent": []}))
    await wait_for(lambda: sc.control.persisted_version == 6, what="snapshot 6 on disk")
    assert orjson.loads(path.read_bytes())["snapshot"]["version"] == 6
    assert os.listdir(state) == [LKG_FILE]


async def test_boots_from_last_known_good_when_no_control_answers(
    sidecars, peers, upstreams, tmp_path
) -> None:
    a = await upstreams(named("a"))
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}))
    state = str(tmp_path / "state")
    app = Address(LOCAL, free_port())
    first = await sidecars(control_config([peer.address], app=app, state_dir=state))
    await wait_for(lambda: first.control.persisted_version == 5, what="snapshot 5 on disk")
    await first.stop()
    await peer.stop()

    # Restarted while its control replica is gone: it serves from the saved snapshot.
    dead = Address(LOCAL, free_port())
    sc = await sidecars(control_config([dead], app=app, state_dir=state))
    assert not sc.ready  # not before lkg_wait: a control replica may still answer
    assert sc.control.applied_version == 5
    await wait_for(lambda: sc.ready, what="ready from last-known-good")
    assert sc.control.from_last_known_good
    assert (await call(sc, "intent")).body == b"a"
    assert (await admin_get(sc, "/ready")).status == 200
    status = (await admin_get(sc, "/config")).json()["control_status"]
    assert status["from_last_known_good"] is True
    assert status["connected"] is False
    assert status["last_error"].startswith(f"cannot connect to control at {dead}")


async def test_keeps_trying_after_booting_from_last_known_good(
    sidecars, peers, upstreams, tmp_path
) -> None:
    a = await upstreams(named("a"))
    b = await upstreams(named("b"))
    state = str(tmp_path / "state")
    app = Address(LOCAL, free_port())
    peer = await peers(snapshot=snapshot(5, {"intent": [a.address]}))
    first = await sidecars(control_config([peer.address], app=app, state_dir=state))
    await wait_for(lambda: first.control.persisted_version == 5, what="snapshot 5 on disk")
    await first.stop()

    mute = await peers(welcome=False)  # accepts, never answers
    sc = await sidecars(control_config([mute.address], app=app, state_dir=state))
    await wait_for(lambda: sc.ready, what="ready from last-known-good")
    assert (await call(sc, "intent")).body == b"a"
    hello = mute.conn.received[0]
    assert hello.applied_version == 5

    mute.conn.send(mp.Welcome("control-m"))
    mute.conn.send(snapshot(8, {"intent": [b.address]}))
    await mute.wait_message(mp.Ack)
    assert (await call(sc, "intent")).body == b"b"
    assert not sc.control.from_last_known_good


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"format": 7}', "not a format 1 last-known-good file"),
        (
            b'{"format": 1, "service": "intent", "namespace": "default", "snapshot": {}}',
            "saved for service 'intent' in namespace 'default', not 'chat' in 'default'",
        ),
        (
            b'{"format": 1, "service": "chat", "namespace": "default", '
            b'"snapshot": {"type": "snapshot", "version": "5"}}',
            "invalid snapshot: snapshot.version: expected an integer >= 0, found string '5'",
        ),
        (
            b'{"format": 1, "service": "chat", "namespace": "default", "snapshot": {"type": '
            b'"snapshot", "version": 5, "services": {"x": {"protocol": "udp"}}, "policies": []}}',
            "snapshot 5): services.x.protocol: expected 'http' or 'tcp', found string 'udp'",
        ),
    ],
    ids=["bad_json", "format", "other_service", "bad_snapshot", "invalid_config"],
)
async def test_unusable_last_known_good_is_ignored_with_the_reason(
    sidecars, tmp_path, content: bytes, why: str
) -> None:
    (tmp_path / LKG_FILE).write_bytes(content)
    dead = Address(LOCAL, free_port())
    sc = await sidecars(control_config([dead], app=dead, state_dir=str(tmp_path)))
    error = sc.control.last_error
    assert error.startswith(f"last-known-good {tmp_path / LKG_FILE} ignored: ")
    assert why in error
    assert sc.control.applied_version == 0
    assert not sc.ready


async def test_draining_is_sent_when_the_sidecar_drains(sidecars, peers, upstreams) -> None:
    a = await upstreams(named("a"))
    peer = await peers(snapshot=snapshot(1, {"intent": [a.address]}))
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    await peer.wait_message(mp.Ack)
    assert not peer.of(mp.Draining)
    await sc.start_drain()
    assert await peer.wait_message(mp.Draining) == mp.Draining()
    assert (await admin_get(sc, "/ready")).json()["reason"] == "draining"


async def test_draining_is_sent_before_the_listeners_stop_accepting(sidecars, peers) -> None:
    peer = await peers(snapshot=snapshot(1, {}))
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    await peer.wait_message(mp.Ack)
    accepting: list[bool] = []
    send_draining = sc.control.send_draining

    def draining() -> None:
        accepting.append(sc.inbound.server.is_serving() and sc.outbound.server.is_serving())
        send_draining()

    sc.control.send_draining = draining
    await sc.start_drain()
    assert accepting == [True]
    await peer.wait_message(mp.Draining)


async def test_draining_is_repeated_to_a_new_replica(sidecars, peers) -> None:
    first = await peers("control-a", snapshot=snapshot(1, {}))
    second = await peers("control-b", snapshot=snapshot(1, {}))
    cfg = control_config([first.address, second.address], app=Address(LOCAL, free_port()))
    sc = await sidecars(cfg)
    await first.wait_message(mp.Ack)
    sc.draining = True  # as drain() sets it, without closing the listeners
    await first.stop()
    await second.wait_message(mp.Draining)


async def test_pings_every_interval_and_records_the_round_trip(sidecars, peers) -> None:
    peer = await peers(snapshot=snapshot(1, {}))
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    await peer.wait_message(mp.Ping, 3)
    pings = peer.of(mp.Ping)
    gaps = [b.time - a.time for a, b in itertools.pairwise(pings)]
    assert all(gap >= FAST.ping_interval * 0.9 for gap in gaps), gaps
    await wait_for(lambda: sc.control.rtt is not None, what="a pong")
    assert len(peer.conns) == 1  # a peer that answers is never dropped


async def test_a_silent_control_is_dropped_and_replaced(sidecars, peers) -> None:
    silent = await peers("control-a", pong=False, snapshot=snapshot(1, {}))
    cfg = control_config([silent.address], app=Address(LOCAL, free_port()))
    sc = await sidecars(cfg)
    await silent.wait_message(mp.Ack)
    await wait_for(lambda: silent.conns[0].closed, timeout=FAST.silence_timeout * 5)
    assert sc.control.last_error == (
        f"control at {silent.address} sent nothing for {FAST.silence_timeout:g}s"
    )
    await silent.wait_connected(2)  # and it connects again
    assert len(silent.conns[0].of(mp.Ping)) >= 3  # it was pinging all along


@pytest.mark.parametrize(
    ("send", "reason", "detail"),
    [
        (lambda c: c.send(mp.Snapshot(1, {}, ())), mp.Reason.UNEXPECTED_MESSAGE,
         "unexpected snapshot message before welcome"),
        (lambda c: (c.send(mp.Welcome("x")), c.send(mp.Ack(1))), mp.Reason.UNEXPECTED_MESSAGE,
         "unexpected ack message from control"),
        (lambda c: c.send(mp.Welcome("x", protocol=2)), mp.Reason.UNSUPPORTED_VERSION,
         "control speaks protocol 2, this sidecar 1"),
        (lambda c: c.write(b"\x00\x00\x00\x02{]"), mp.Reason.BAD_JSON, "frame is not valid JSON"),
        (lambda c: c.write(b"\x7f\xff\xff\xff"), mp.Reason.FRAME_TOO_LARGE,
         f"frame of {0x7FFFFFFF} bytes exceeds"),
    ],
    ids=["snapshot_before_welcome", "ack_from_control", "version_2", "bad_json", "huge_frame"],
)  # fmt: skip
async def test_protocol_violations_answer_error_close_and_retry(
    sidecars, peers, send, reason: str, detail: str
) -> None:
    peer = await peers(welcome=False)
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    conn = await peer.wait_connected()
    send(conn)
    error = await peer.wait_message(mp.Error)
    assert error.reason == reason
    assert error.detail.startswith(detail), error.detail
    await wait_for(lambda: conn.closed, what="the stream closed")
    assert sc.control.last_error.startswith(
        f"protocol error on the stream to control at {peer.address}: {reason}: "
    )
    await peer.wait_connected(2)


async def test_an_error_from_control_ends_the_stream_and_is_reported(sidecars, peers) -> None:
    peer = await peers(welcome=False)
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    conn = await peer.wait_connected()
    conn.send(mp.Error(mp.Reason.INVALID_TOKEN, "token expired"))
    await wait_for(lambda: conn.closed, what="the stream closed")
    assert sc.control.last_error == (
        f"control at {peer.address} ended the stream: invalid_token: token expired"
    )
    assert not peer.of(mp.Error)  # nothing to answer to an error
    await peer.wait_connected(2)


async def test_unknown_messages_are_ignored(sidecars, peers, upstreams) -> None:
    a = await upstreams(named("a"))
    peer = await peers()
    sc = await sidecars(control_config([peer.address], app=Address(LOCAL, free_port())))
    conn = await peer.wait_connected()
    conn.send(mp.Unknown("x-future", {"type": "x-future", "n": 1}))
    conn.send(snapshot(2, {"intent": [a.address]}))
    assert await peer.wait_message(mp.Ack) == mp.Ack(2)
    assert len(peer.conns) == 1
    assert (await call(sc, "intent")).body == b"a"
