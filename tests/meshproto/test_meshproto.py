"""The control-stream codec: every message round-trips; every decoder case is fed
whole, one byte at a time, and followed by trailing data."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from types import MappingProxyType

import orjson
import pytest

from lepton_mesh import meshproto as mp
from lepton_mesh.meshproto import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    Message,
    ProtocolError,
    Reason,
    encode,
)

INSTANCE = mp.Instance(
    address="10.0.0.5",
    ports=MappingProxyType({"http": 15006}),
    labels=MappingProxyType({"version": "v1", "zone": "a"}),
    weight=3,
)
ROUTE = {
    "apiVersion": "lepton-mesh/v1",
    "kind": "Route",
    "metadata": {"name": "dialog", "namespace": "default"},
    "spec": {"destination": "dialog", "rules": [{"backends": [{"service": "dialog"}]}]},
}
SERVICES = {
    "intent": {
        "protocol": "http",
        "endpoints": [{"address": "10.0.0.7:15006", "weight": 1, "labels": {}, "healthy": True}],
    }
}

MESSAGES: list[tuple[str, Message]] = [
    ("hello", mp.Hello("chat-1", "chat", "default", INSTANCE, ("intent", "dialog"), 12, "tok")),
    ("hello_minimal", mp.Hello("chat-1", "chat", "default", mp.Instance("h", {"http": 1}))),
    ("hello_wildcard", mp.Hello("c", "chat", "ns", INSTANCE, ("*",), 0, None, PROTOCOL_VERSION)),
    ("welcome", mp.Welcome("control-a")),
    ("snapshot", mp.Snapshot(7, SERVICES, (ROUTE,))),
    ("snapshot_empty", mp.Snapshot(0, {}, ())),
    ("ack", mp.Ack(7)),
    ("nack", mp.Nack(7, "snapshot 7: services.intent.endpoints[0].address: invalid address")),
    ("health_up", mp.Health(True)),
    ("health_down", mp.Health(False, "status 503")),
    ("draining", mp.Draining()),
    ("ping", mp.Ping(1764190000.25)),
    ("pong", mp.Pong(1764190000.25)),
    ("error", mp.Error(Reason.UNSUPPORTED_VERSION, "this control speaks protocol 1")),
    ("error_no_detail", mp.Error(Reason.BAD_HELLO)),
    ("unknown", mp.Unknown("telemetry", {"type": "telemetry", "rps": 12})),
]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def frame_json(obj: object) -> bytes:
    return frame(orjson.dumps(obj))


def feeds(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The same bytes as one read, one byte per read, and in two uneven halves."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    cut = len(data) // 3
    yield "split", [data[:cut], data[cut:]]


def drain(decoder: FrameDecoder, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("msg", [m for _, m in MESSAGES], ids=[n for n, _ in MESSAGES])
def test_each_message_round_trips(msg: Message) -> None:
    data = encode(msg)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    obj = orjson.loads(data[4:])
    assert obj["type"] == mp.msg_type(msg)
    assert next(iter(obj)) == "type"  # readable in a packet capture
    for how, chunks in feeds(data):
        assert drain(FrameDecoder(), chunks) == [msg], how


@pytest.mark.parametrize("msg", [m for _, m in MESSAGES], ids=[n for n, _ in MESSAGES])
def test_trailing_data_stays_buffered_for_the_next_message(msg: Message) -> None:
    after = encode(mp.Ack(99))
    for how, chunks in feeds(encode(msg) + after[:5]):
        decoder = FrameDecoder()
        assert drain(decoder, chunks) == [msg], how
        assert decoder.buffered == 5
        assert drain(decoder, [after[5:]]) == [mp.Ack(99)]
        assert decoder.buffered == 0


def test_wire_fields_are_the_documented_ones() -> None:
    assert orjson.loads(encode(MESSAGES[0][1])[4:]) == {
        "type": "hello",
        "node_id": "chat-1",
        "service": "chat",
        "namespace": "default",
        "instance": {
            "address": "10.0.0.5",
            "ports": {"http": 15006},
            "labels": {"version": "v1", "zone": "a"},
            "weight": 3,
        },
        "dependencies": ["intent", "dialog"],
        "applied_version": 12,
        "token": "tok",
        "protocol": 1,
    }
    assert orjson.loads(encode(mp.Draining())[4:]) == {"type": "draining"}
    assert orjson.loads(encode(mp.Snapshot(3, SERVICES, (ROUTE,)))[4:]) == {
        "type": "snapshot",
        "version": 3,
        "services": SERVICES,
        "policies": [ROUTE],
    }


def test_many_frames_in_one_read_and_across_reads() -> None:
    msgs = [mp.Ack(i) if i % 2 else mp.Ping(float(i)) for i in range(1000)]
    data = b"".join(encode(m) for m in msgs)
    for how, chunks in feeds(data):
        if how == "bytewise":
            continue  # 10k calls prove nothing more than the table above
        decoder = FrameDecoder()
        assert drain(decoder, chunks) == msgs
        assert decoder.buffered == 0
    # odd-sized reads that cut headers and bodies everywhere
    decoder = FrameDecoder()
    got = drain(decoder, [data[i : i + 7] for i in range(0, len(data), 7)])
    assert got == msgs
    assert len(decoder._buf) < 64, "consumed bytes must be dropped, not kept"


def test_fields_a_message_does_not_define_are_ignored() -> None:
    data = frame_json({"type": "ack", "version": 4, "applied_at": 1.5})
    assert drain(FrameDecoder(), [data]) == [mp.Ack(4)]


def test_unknown_type_is_returned_and_the_stream_goes_on() -> None:
    data = frame_json({"type": "x-future", "a": [1]}) + encode(mp.Pong(2.0))
    for how, chunks in feeds(data):
        got = drain(FrameDecoder(), chunks)
        assert got == [mp.Unknown("x-future", {"type": "x-future", "a": [1]}), mp.Pong(2.0)], how


def test_a_frame_of_exactly_max_frame_is_accepted() -> None:
    payload = orjson.dumps({"type": "ack", "version": 1})
    decoder = FrameDecoder(max_frame=len(payload))
    assert drain(decoder, [frame(payload)]) == [mp.Ack(1)]


# --- errors -------------------------------------------------------------------------

ERRORS: list[tuple[str, bytes, str, str]] = [
    ("empty_frame", frame(b""), Reason.BAD_JSON, "frame is not valid JSON"),
    ("not_json", frame(b"{type: ack}"), Reason.BAD_JSON, "frame is not valid JSON"),
    ("not_utf8", frame(b'{"type": "\xff"}'), Reason.BAD_JSON, "frame is not valid JSON"),
    ("nan", frame(b'{"type": "ping", "time": NaN}'), Reason.BAD_JSON, "frame is not valid JSON"),
    ("array", frame_json([1, 2]), Reason.BAD_MESSAGE,
     "frame: expected a JSON object, found a list"),
    ("no_type", frame_json({"version": 1}), Reason.BAD_MESSAGE, "frame: missing field 'type'"),
    ("type_not_string", frame_json({"type": 5}), Reason.BAD_MESSAGE,
     "frame.type: expected a string, found integer 5"),
    ("missing_field", frame_json({"type": "ack"}), Reason.BAD_MESSAGE,
     "ack: missing field 'version'"),
    ("version_as_string", frame_json({"type": "ack", "version": "3"}), Reason.BAD_MESSAGE,
     "ack.version: expected an integer >= 0, found string '3'"),
    ("version_as_bool", frame_json({"type": "nack", "version": True, "error": "x"}),
     Reason.BAD_MESSAGE, "nack.version: expected an integer >= 0, found boolean true"),
    ("negative_version", frame_json({"type": "snapshot", "version": -1, "services": {},
                                     "policies": []}),
     Reason.BAD_MESSAGE, "snapshot.version: expected an integer >= 0, found integer -1"),
    ("snapshot_without_services", frame_json({"type": "snapshot", "version": 1, "policies": []}),
     Reason.BAD_MESSAGE, "snapshot: missing field 'services'"),
    ("service_not_object", frame_json({"type": "snapshot", "version": 1,
                                       "services": {"intent": []}, "policies": []}),
     Reason.BAD_MESSAGE, "snapshot.services.intent: expected an object, found a list"),
    ("policy_not_object", frame_json({"type": "snapshot", "version": 1, "services": {},
                                      "policies": ["routes.yaml"]}),
     Reason.BAD_MESSAGE, "snapshot.policies[0]: expected an object, found string 'routes.yaml'"),
    ("health_not_bool", frame_json({"type": "health", "healthy": "yes"}), Reason.BAD_MESSAGE,
     "health.healthy: expected true or false, found string 'yes'"),
    ("ping_time_null", frame_json({"type": "ping", "time": None}), Reason.BAD_MESSAGE,
     "ping.time: expected a number, found null"),
    ("welcome_without_protocol", frame_json({"type": "welcome", "control_id": "a"}),
     Reason.BAD_MESSAGE, "welcome: missing field 'protocol'"),
    ("hello_bad_port", frame_json({
        "type": "hello", "protocol": 1, "node_id": "n", "service": "s", "namespace": "d",
        "instance": {"address": "h", "ports": {"http": 0}}, "dependencies": [],
        "applied_version": 0}),
     Reason.BAD_MESSAGE, "hello.instance.ports.http: expected a port number 1-65535, found integer 0"),
    ("hello_empty_dependency", frame_json({
        "type": "hello", "protocol": 1, "node_id": "n", "service": "s", "namespace": "d",
        "instance": {"address": "h", "ports": {}}, "dependencies": ["a", ""],
        "applied_version": 0}),
     Reason.BAD_MESSAGE, "hello.dependencies[1]: expected a non-empty string, found string ''"),
    ("hello_label_not_string", frame_json({
        "type": "hello", "protocol": 1, "node_id": "n", "service": "s", "namespace": "d",
        "instance": {"address": "h", "ports": {}, "labels": {"v": 2}}, "dependencies": [],
        "applied_version": 0}),
     Reason.BAD_MESSAGE, "hello.instance.labels.v: expected a string, found integer 2"),
    ("hello_without_node_id", frame_json({
        "type": "hello", "protocol": 1, "service": "s", "namespace": "d",
        "instance": {"address": "h", "ports": {}}, "dependencies": [], "applied_version": 0}),
     Reason.BAD_MESSAGE, "hello: missing field 'node_id'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "reason", "detail"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_decoder_errors(data: bytes, reason: str, detail: str) -> None:
    for how, chunks in feeds(data + encode(mp.Ack(1))):
        decoder = FrameDecoder()
        with pytest.raises(ProtocolError) as info:
            drain(decoder, chunks)
        assert info.value.reason == reason, how
        assert info.value.detail.startswith(detail), (how, info.value.detail)
        # final: the valid frame after it is never returned
        with pytest.raises(ProtocolError) as again:
            decoder.next_message()
        assert again.value is info.value


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", MAX_FRAME + 1)[:3])
    assert decoder.next_message() is None
    decoder.feed(struct.pack(">I", MAX_FRAME + 1)[3:])
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.reason == Reason.FRAME_TOO_LARGE
    assert info.value.detail == f"frame of {MAX_FRAME + 1} bytes exceeds the {MAX_FRAME} byte limit"
    decoder.feed(b"x" * 1000)  # dropped: nothing is buffered after the error
    assert decoder.buffered == 0


def test_max_frame_is_the_payload_size() -> None:
    payload = orjson.dumps({"type": "ack", "version": 1})
    decoder = FrameDecoder(max_frame=len(payload) - 1)
    with pytest.raises(ProtocolError) as info:
        drain(decoder, [frame(payload)])
    assert info.value.reason == Reason.FRAME_TOO_LARGE


def test_encode_refuses_a_frame_the_peer_would_refuse() -> None:
    big = mp.Snapshot(1, {}, ({"blob": "x" * MAX_FRAME},))
    with pytest.raises(ProtocolError) as info:
        encode(big)
    assert info.value.reason == Reason.FRAME_TOO_LARGE
    assert info.value.detail.startswith("snapshot frame of ")


def test_message_from_json_is_the_decoders_validation() -> None:
    assert mp.message_from_json({"type": "ack", "version": 2}) == mp.Ack(2)
    with pytest.raises(
        ProtocolError, match=r"ack\.version: expected an integer >= 0, found number 2\.5"
    ):
        mp.message_from_json({"type": "ack", "version": 2.5})
    assert mp.message_to_json(mp.Ack(2)) == {"type": "ack", "version": 2}
