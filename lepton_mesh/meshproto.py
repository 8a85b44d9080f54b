"""The sidecar <-> control stream, protocol version 1: messages and frames, no I/O.

Shared by both ends (the sidecar's `proxy/mesh/control_client.py`, the control
daemon's push server). docs/control-plane.md is the specification; this
module is its executable form.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON: one
object whose `"type"` names the message. `encode(msg)` gives a frame;
`FrameDecoder` is fed bytes as they arrive and hands out messages:

    decoder.feed(data)                       # only appends
    while (msg := decoder.next_message()) is not None:
        handle(msg)

Rules the decoder keeps (what a peer can count on):
- Reading is O(bytes): the buffer keeps the offset of the next frame, each
  header is read once, and consumed bytes are dropped only when they are at
  least half the buffer (so each byte is moved at most once on average).
- A frame whose header announces more than `MAX_FRAME` bytes (16 MiB) is
  refused as soon as the 4 header bytes arrive, before its body is
  buffered, so memory stays bounded by one frame plus one read.
- Known message types are checked field by field: a missing field or a
  value of the wrong type is a `ProtocolError` naming the message, the field
  and what was found. Fields a message does not define are ignored, so a
  later minor revision may add optional fields.
- Unknown message types are not errors (forward compatibility): they come
  out as `Unknown(type, data)`, which receivers ignore. Only the envelope
  is checked: an object with a string `type`.
- Any `ProtocolError` is final: the stream can no longer be trusted, and
  every later `next_message()` raises the same error. The receiver answers
  with an `Error` message if it can and closes the connection.
- Version negotiation is not the codec's job: a `Hello` with
  `protocol: 2` decodes fine; the control daemon answers it with
  `Error(reason="unsupported_version")`.

A snapshot's `services` and `policies` are checked here only as far as
their envelope (an object of objects, a list of objects). Their content is
configuration, validated by the sidecar's config loaders, so a bad
snapshot is answered with a `Nack` naming the problem instead of breaking
the stream.

Workload identity (docs/security.md) adds three messages, all ignored by a
peer that predates them: `csr` (sidecar to control: sign this request),
`certificate` (the signed chain, with the trust bundle it verifies under)
and `trust` (the trust bundle and the issuing CA, sent after Welcome and
whenever either changes). A CSR carries a public key only: the private key
never leaves the sidecar.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import orjson

from lepton_mesh.policy.fields import describe

__all__ = [
    "CONTROL_NAMESPACE",
    "CONTROL_SERVICE",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "Ack",
    "Certificate",
    "Csr",
    "Draining",
    "Error",
    "FrameDecoder",
    "Health",
    "Hello",
    "Instance",
    "Message",
    "Nack",
    "Ping",
    "Pong",
    "ProtocolError",
    "Reason",
    "Snapshot",
    "Trust",
    "Unknown",
    "Welcome",
    "encode",
    "message_from_json",
    "message_to_json",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024  # bytes of JSON in one frame, header not counted
# The control daemon's own identity on a TLS stream: spiffe://<td>/ns/lepton-system/svc/control.
# The namespace is reserved: no sidecar may join in it.
CONTROL_NAMESPACE = "lepton-system"
CONTROL_SERVICE = "control"
_HEADER = struct.Struct(">I")


class Reason:
    """Reason codes: of a `ProtocolError`, and of the `Error` message's `reason`."""

    FRAME_TOO_LARGE = "frame_too_large"
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"  # not an object, no type, a field missing or mistyped
    # Sent by the control daemon in `Error` (the stream is then closed):
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_HELLO = "bad_hello"
    INVALID_TOKEN = "invalid_token"
    UNEXPECTED_MESSAGE = "unexpected_message"  # a valid message at the wrong time
    NODE_ID_TAKEN = "node_id_taken"  # another service/namespace/identity holds this node_id
    SUPERSEDED = "superseded"  # a newer stream registered this node_id: this one is closed
    # Identity (docs/security.md). A refused CSR's `Error` carries the CA's own
    # reason instead (`identity.errors.CsrReason`: malformed_csr, ...).
    MISSING_TOKEN = "missing_token"  # no certificate and no join token
    EXPIRED_TOKEN = "expired_token"
    IDENTITY_MISMATCH = "identity_mismatch"  # token or certificate names another workload
    CA_UNAVAILABLE = "ca_unavailable"  # a CSR to a control daemon without a CA
    TOO_MANY_CSRS = "too_many_csrs"


class ProtocolError(Exception):
    """The peer broke the framing or sent an invalid message; `reason` is a `Reason` code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


# --- messages ----------------------------------------------------------------
# Each has a `TYPE` (the wire name); its dataclass fields are the JSON fields.


@dataclass(frozen=True, slots=True)
class Instance:
    """What a sidecar registers: reached at `address` on `ports` (protocol -> port)."""

    address: str
    ports: Mapping[str, int]
    labels: Mapping[str, str] = field(default_factory=_empty)
    weight: int = 1


# Sidecar to control.


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of a stream. `applied_version` is 0 when nothing was applied yet."""

    TYPE: ClassVar[str] = "hello"
    node_id: str
    service: str
    namespace: str
    instance: Instance
    dependencies: tuple[str, ...] = ()
    applied_version: int = 0
    token: str | None = None  # a join token, from the mTLS work on
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    version: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Snapshot `version` was rejected; the sidecar keeps the config it had."""

    TYPE: ClassVar[str] = "nack"
    version: int
    error: str


@dataclass(frozen=True, slots=True)
class Health:
    """The local app's health changed (and, after each Welcome, what it is now)."""

    TYPE: ClassVar[str] = "health"
    healthy: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Draining:
    """The sidecar started draining: callers must stop sending to it."""

    TYPE: ClassVar[str] = "draining"


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    time: float


@dataclass(frozen=True, slots=True)
class Csr:
    """Sign a certificate for this sidecar: a PEM CSR for its SPIFFE ID.

    Control signs only the identity the stream proved (join token or client
    certificate), never one the CSR merely asks for.
    """

    TYPE: ClassVar[str] = "csr"
    csr_pem: str


# Control to sidecar.


@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    control_id: str
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The complete config one sidecar needs, never a delta.

    `services`: name -> {"protocol", "endpoints": [{address, weight, labels,
    healthy}]}; `policies`: manifests. Both in the sidecar config's YAML
    shape, validated by its loaders when applied.
    """

    TYPE: ClassVar[str] = "snapshot"
    version: int
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)
    policies: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Certificate:
    """The answer to a `Csr`: the chain (leaf first, then the intermediate), the
    trust bundle (PEM roots) to install with it, and the leaf's expiry (Unix time)."""

    TYPE: ClassVar[str] = "certificate"
    chain_pem: str
    bundle_pem: str
    not_after: float


@dataclass(frozen=True, slots=True)
class Trust:
    """The roots to accept, and `issuer`: the SHA-256 fingerprint (hex) of the CA
    certificate control issues from. Sent after Welcome and on every change; a
    sidecar whose bundle or issuer differs asks for a new certificate at once."""

    TYPE: ClassVar[str] = "trust"
    bundle_pem: str
    issuer: str


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    time: float


@dataclass(frozen=True, slots=True)
class Error:
    """Fatal for the stream: the sender closes it after this frame."""

    TYPE: ClassVar[str] = "error"
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type this version does not know; `data` is the whole object."""

    type: str
    data: Mapping[str, Any]


Message = (
    Hello
    | Ack
    | Nack
    | Health
    | Draining
    | Ping
    | Csr
    | Welcome
    | Snapshot
    | Certificate
    | Trust
    | Pong
    | Error
    | Unknown
)


# --- field checkers: (value, where) -> converted value, or ProtocolError -----

Check = Callable[[Any, str], Any]


def _bad(where: str, what: str, value: Any) -> ProtocolError:
    return ProtocolError(Reason.BAD_MESSAGE, f"{where}: expected {what}, found {describe(value)}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "a string", value)
    return value


def _nonempty_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, "a non-empty string", value)
    return value


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _uint(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, "an integer >= 0", value)
    return value


def _time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, "a number", value)
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "true or false", value)
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad(where, "a list of strings", value)
    return tuple(_nonempty_str(v, f"{where}[{i}]") for i, v in enumerate(value))


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _objects_by_name(value: Any, where: str) -> Mapping[str, Mapping[str, Any]]:
    obj = _object(value, where)
    for name, item in obj.items():
        _object(item, f"{where}.{name}")
    return MappingProxyType(obj)


def _object_list(value: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        raise _bad(where, "a list of objects", value)
    return tuple(_object(v, f"{where}[{i}]") for i, v in enumerate(value))


def _str_map(value: Any, where: str) -> Mapping[str, str]:
    obj = _object(value, where)
    for key, item in obj.items():
        _str(item, f"{where}.{key}")
    return MappingProxyType(obj)


def _ports(value: Any, where: str) -> Mapping[str, int]:
    obj = _object(value, where)
    for key, port in obj.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _bad(f"{where}.{key}", "a port number 1-65535", port)
    return MappingProxyType(obj)


def _weight(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise _bad(where, "an integer 1-10000", value)
    return value


def _instance(value: Any, where: str) -> Instance:
    return _build(Instance, _object(value, where), where)


_ABSENT = object()

# Per class: (field, checker), in dataclass order: the wire fields.
_CHECKS: dict[type, tuple[tuple[str, Check], ...]] = {
    Instance: (("address", _nonempty_str), ("ports", _ports), ("labels", _str_map),
               ("weight", _weight)),
    Hello: (("node_id", _nonempty_str), ("service", _nonempty_str), ("namespace", _nonempty_str),
            ("instance", _instance), ("dependencies", _names), ("applied_version", _uint),
            ("token", _opt_str), ("protocol", _uint)),
    Ack: (("version", _uint),),
    Nack: (("version", _uint), ("error", _str)),
    Health: (("healthy", _bool), ("detail", _str)),
    Draining: (),
    Ping: (("time", _time),),
    Csr: (("csr_pem", _nonempty_str),),
    Welcome: (("control_id", _str), ("protocol", _uint)),
    Snapshot: (("version", _uint), ("services", _objects_by_name), ("policies", _object_list)),
    Certificate: (("chain_pem", _nonempty_str), ("bundle_pem", _nonempty_str),
                  ("not_after", _time)),
    Trust: (("bundle_pem", _nonempty_str), ("issuer", _nonempty_str)),
    Pong: (("time", _time),),
    Error: (("reason", _str), ("detail", _str)),
}  # fmt: skip
# Fields a frame may leave out (the dataclass default applies). Every other
# field is required on the wire even where the dataclass has a default for
# convenience: a snapshot without `services` must not read as "no services",
# nor a hello without `protocol` as version 1.
_OPTIONAL: dict[type, frozenset[str]] = {
    Instance: frozenset({"labels", "weight"}),
    Hello: frozenset({"token"}),
    Health: frozenset({"detail"}),
    Error: frozenset({"detail"}),
}
_BY_TYPE: dict[str, type] = {cls.TYPE: cls for cls in _CHECKS if cls is not Instance}


def _build(cls: type, obj: Mapping[str, Any], where: str) -> Any:
    kwargs: dict[str, Any] = {}
    for name, check in _CHECKS[cls]:
        value = obj.get(name, _ABSENT)
        if value is _ABSENT:
            if name not in _OPTIONAL.get(cls, ()):
                raise ProtocolError(Reason.BAD_MESSAGE, f"{where}: missing field {name!r}")
            continue
        kwargs[name] = check(value, f"{where}.{name}")
    return cls(**kwargs)


def message_from_json(obj: Any) -> Message:
    """A message from parsed JSON; `ProtocolError` if a known type is malformed."""
    if not isinstance(obj, dict):
        raise _bad("frame", "a JSON object", obj)
    kind = obj.get("type", _ABSENT)
    if kind is _ABSENT:
        raise ProtocolError(Reason.BAD_MESSAGE, "frame: missing field 'type'")
    if not isinstance(kind, str):
        raise _bad("frame.type", "a string", kind)
    cls = _BY_TYPE.get(kind)
    if cls is None:
        return Unknown(kind, obj)
    return _build(cls, obj, kind)  # type: ignore[no-any-return]


def message_to_json(msg: Message) -> dict[str, Any]:
    """The JSON object for `msg` (what `encode` frames), `"type"` first."""
    if isinstance(msg, Unknown):
        return {"type": msg.type, **msg.data}
    out: dict[str, Any] = {"type": msg.TYPE}
    for name, _check in _CHECKS[type(msg)]:
        out[name] = getattr(msg, name)
    return out


def _default(value: Any) -> Any:
    # orjson writes dicts, lists, tuples and dataclasses itself; read-only
    # mappings (MappingProxyType) come here.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(msg: Message) -> bytes:
    """One frame. Raises `ProtocolError(frame_too_large)` rather than write a frame
    the peer must refuse."""
    payload = orjson.dumps(message_to_json(msg), default=_default)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(
            Reason.FRAME_TOO_LARGE,
            f"{msg_type(msg)} frame of {len(payload)} bytes exceeds the {MAX_FRAME} byte limit",
        )
    return _HEADER.pack(len(payload)) + payload


def msg_type(msg: Message) -> str:
    return msg.type if isinstance(msg, Unknown) else msg.TYPE


# --- decoding ------------------------------------------------------------------


class FrameDecoder:
    """Bytes in, messages out. See the module docstring for the rules it keeps."""

    __slots__ = ("_buf", "_error", "_pos", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the next frame in _buf; bytes before it are consumed
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._error is None:
            self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _HEADER.size:
            self._compact()
            return None
        (size,) = _HEADER.unpack_from(buf, pos)
        if size > self.max_frame:
            raise self._fail(
                Reason.FRAME_TOO_LARGE,
                f"frame of {size} bytes exceeds the {self.max_frame} byte limit",
            )
        start = pos + _HEADER.size
        end = start + size
        if len(buf) < end:
            self._compact()
            return None
        self._pos = end
        # orjson reads the frame in place; both views are released before
        # the buffer is resized again.
        with memoryview(buf) as view, view[start:end] as payload:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError as e:
                raise self._fail(Reason.BAD_JSON, f"frame is not valid JSON: {e}") from None
        try:
            return message_from_json(obj)
        except ProtocolError as e:
            self._error = e
            raise

    def _fail(self, reason: str, detail: str) -> ProtocolError:
        self._error = ProtocolError(reason, detail)
        self._buf = bytearray()
        self._pos = 0
        return self._error

    def _compact(self) -> None:
        # Drop consumed bytes only when they are at least half the buffer:
        # the move then costs no more than the bytes consumed since the last one.
        pos = self._pos
        if pos and pos * 2 >= len(self._buf):
            del self._buf[:pos]
            self._pos = 0
