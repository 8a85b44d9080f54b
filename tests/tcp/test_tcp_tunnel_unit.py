"""The tunnel's rules without a network: fake transports record what the
tunnel asks of them, and each case feeds a sequence of protocol events.

A case is (handover keyword arguments, transport setup, events, the calls
expected on a and on b, the on_closed result). Events name the end they are
delivered to: ("a", "eof") is `eof_received()` on a's protocol.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from lepton_mesh.proxy.l4.tunnel import splice

HIGH = 100


@dataclass
class FakeSocket:
    calls: list[str]

    def setsockopt(self, *args: Any) -> None:
        self.calls.append("linger0")


@dataclass
class FakeTransport:
    """Just enough of asyncio.Transport; `calls` lists what the tunnel did."""

    can_eof: bool = True
    buffered: int = 0
    closing: bool = False
    reading: bool = True
    calls: list[str] = field(default_factory=list)
    protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, p: asyncio.BaseProtocol) -> None:
        self.protocol = p

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {data.decode()}")

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def can_write_eof(self) -> bool:
        return self.can_eof

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (HIGH // 4, HIGH)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return FakeSocket(self.calls) if name == "socket" else default


ERR = ConnectionResetError("peer reset")

# (id, splice kwargs, (a setup, b setup), events, calls on a, calls on b, on_closed)
CASES: list[
    tuple[
        str,
        dict[str, Any],
        tuple[dict[str, Any], dict[str, Any]],
        list[tuple[Any, ...]],
        list[str],
        list[str],
        list[tuple[int, int]],
    ]
] = [
    (
        "handover resumes reading on both",
        {},
        ({"reading": False}, {}),
        [],
        ["resume_reading"],
        ["resume_reading"],
        [],
    ),
    (
        "pre-read bytes go first, counted",
        {"a_to_b": b"x", "b_to_a": b"yy"},
        ({}, {}),
        [("a", "data", b"z")],
        ["write yy", "resume_reading"],
        ["write x", "resume_reading", "write z"],
        [],
    ),
    (
        "peer over high water at handover: stay paused until resume_writing",
        {},
        ({}, {"buffered": HIGH + 1}),
        [("b", "resume_writing")],
        ["pause_reading", "resume_reading"],
        ["resume_reading"],
        [],
    ),
    (
        "exactly at the high-water mark is not over it",
        {},
        ({}, {"buffered": HIGH}),
        [],
        ["resume_reading"],
        ["resume_reading"],
        [],
    ),
    (
        "pause_writing on b pauses reading a, resume resumes",
        {},
        ({}, {}),
        [("b", "pause_writing"), ("b", "resume_writing")],
        ["resume_reading", "pause_reading", "resume_reading"],
        ["resume_reading"],
        [],
    ),
    (
        "eof from a half-closes b",
        {},
        ({}, {}),
        [("a", "eof")],
        ["resume_reading"],
        ["resume_reading", "write_eof"],
        [],
    ),
    (
        "eof from a closes b when b cannot half-close (TLS)",
        {},
        ({}, {"can_eof": False}),
        [("a", "eof")],
        ["resume_reading"],
        ["resume_reading", "close"],
        [],
    ),
    (
        "second eof is ignored",
        {},
        ({}, {}),
        [("a", "eof"), ("a", "eof")],
        ["resume_reading"],
        ["resume_reading", "write_eof"],
        [],
    ),
    (
        "eof both ways closes both",
        {},
        ({}, {}),
        [("a", "eof"), ("b", "eof")],
        ["resume_reading", "close"],  # close() also sends FIN, after the buffer
        ["resume_reading", "write_eof", "close"],
        [],
    ),
    (
        "after eof, a's reading is never resumed (would re-read EOF)",
        {},
        ({}, {}),
        [("b", "pause_writing"), ("a", "eof"), ("b", "resume_writing")],
        ["resume_reading", "pause_reading"],
        ["resume_reading", "write_eof"],
        [],
    ),
    (
        "eof already read at handover: forwarded, a is never read again",
        {"a_to_b": b"req", "a_eof": True},
        ({"reading": False}, {}),
        [],
        [],
        ["write req", "write_eof", "resume_reading"],
        [],
    ),
    (
        "reset on a resets b",
        {},
        ({}, {}),
        [("a", "lost", ERR), ("b", "lost", None)],
        ["resume_reading"],
        ["resume_reading", "linger0", "abort"],
        [(0, 0)],
    ),
    (
        "clean close of a closes b gracefully",
        {},
        ({}, {}),
        [("a", "data", b"hi"), ("a", "lost", None), ("b", "lost", None)],
        ["resume_reading"],
        ["resume_reading", "write hi", "close"],
        [(2, 0)],
    ),
    (
        "data for a closing peer is dropped, not counted",
        {},
        ({}, {}),
        [("b", "data", b"1"), ("a", "lost", ERR), ("a", "data", b"late"), ("b", "lost", None)],
        ["resume_reading", "write 1"],
        ["resume_reading", "linger0", "abort"],
        [(0, 1)],
    ),
    (
        "on_closed exactly once, counts in (a_to_b, b_to_a) order",
        {},
        ({}, {}),
        [
            ("a", "data", b"abc"),
            ("b", "data", b"de"),
            ("b", "lost", None),
            ("a", "lost", None),
            ("a", "lost", None),
            ("b", "lost", ERR),
        ],
        ["resume_reading", "write de", "close"],
        ["resume_reading", "write abc"],
        [(3, 2)],
    ),
    (
        "closing at handover: counts as closed, peer closed after pre-read bytes",
        {"a_to_b": b"bye"},
        ({"closing": True}, {}),
        [("a", "lost", None), ("b", "lost", None)],
        [],
        ["write bye", "close"],
        [(3, 0)],
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "setup", "events", "want_a", "want_b", "want_closed"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
async def test_tunnel_rules(
    kwargs: dict[str, Any],
    setup: tuple[dict[str, Any], dict[str, Any]],
    events: list[tuple[Any, ...]],
    want_a: list[str],
    want_b: list[str],
    want_closed: list[tuple[int, int]],
) -> None:
    a, b = FakeTransport(**setup[0]), FakeTransport(**setup[1])
    closed: list[tuple[int, int]] = []
    splice(a, b, on_closed=lambda x, y: closed.append((x, y)), **kwargs)  # type: ignore[arg-type]
    for end, event, *arg in events:
        p: Any = (a if end == "a" else b).protocol
        if event == "data":
            p.data_received(arg[0])
        elif event == "eof":
            assert p.eof_received() is True  # keep the transport: the tunnel closes it
        elif event == "lost":
            p.connection_lost(arg[0])
        else:
            getattr(p, event)()
    await asyncio.sleep(0)  # on_closed is deferred when decided inside splice
    assert a.calls == want_a
    assert b.calls == want_b
    assert closed == want_closed
