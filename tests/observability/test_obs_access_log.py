"""AccessLog: batching, the flush timer, the 1 MiB bound, a reader that goes away."""

from __future__ import annotations

import json
import os

import orjson
import pytest
from obs_support import FakeLoop, ListStream, PipeReader, wait_until

from lepton_mesh.proxy.observe.access_log import DEFER_MAX, FLUSH_BYTES, MAX_BYTES, AccessLog

RECORD = {
    "time": "2024-05-01T12:34:56.789012Z",
    "reporter": "destination",
    "method": "GET",
    "authority": "ratings.default:8080",
    "path": "/ratings/42",
    "protocol": "HTTP/1.1",
    "status": 200,
    "reason": "-",
    "duration_ms": 3.412,
    "upstream_ms": 2.981,
    "request_bytes": 0,
    "response_bytes": 1834,
    "upstream": "10.0.3.17:8080",
    "request_id": "6f1c2a0e",
    "traceparent": None,
    "attempts": 1,
    "downstream": "10.0.1.5:51234",
}
LINE = orjson.dumps(RECORD) + b"\n"


def record(i: int) -> dict:
    return {**RECORD, "request_id": f"{i:08d}"}


def test_a_line_waits_for_the_timer_which_is_armed_only_while_lines_wait() -> None:
    loop, stream = FakeLoop(), ListStream()
    log = AccessLog(True, stream, loop)  # type: ignore[arg-type]
    assert loop.live() == []

    log.log(RECORD)
    log.log(RECORD)
    (timer,) = loop.live()  # one timer for both lines
    assert timer.delay == 0.1
    assert stream.data == b""

    loop.fire()
    assert log.wait_written(5)
    assert stream.data == LINE * 2
    assert loop.live() == [] and not log.timer_armed
    assert log.held_bytes == 0

    log.log(RECORD)  # the buffer is non-empty again: the timer is re-armed
    assert len(loop.live()) == 1
    log.close()
    assert stream.data == LINE * 3


def test_passing_flush_bytes_hands_the_batch_over_without_the_timer() -> None:
    loop, stream = FakeLoop(), ListStream()
    log = AccessLog(True, stream, loop)  # type: ignore[arg-type]
    n = FLUSH_BYTES // len(LINE) + 1  # the line that passes 64 KiB
    for i in range(n):
        log.log(record(i))
    assert log.wait_written(5)
    assert loop.live() == []  # the size flush cancelled the timer
    lines = stream.data.splitlines()
    assert len(lines) == n
    assert [orjson.loads(x)["request_id"] for x in lines] == [f"{i:08d}" for i in range(n)]
    assert len(stream.chunks) == 1  # one write for the whole batch
    log.close()


def test_beyond_max_bytes_lines_are_dropped_and_counted() -> None:
    stream = ListStream()
    stream.gate.clear()  # the reader stalls: the writer thread blocks in write()
    log = AccessLog(True, stream, FakeLoop(), flush_bytes=4096, max_bytes=32768)  # type: ignore[arg-type]
    line_len = len(orjson.dumps(record(0))) + 1
    for i in range(1000):
        log.log(record(i))
    kept = 32768 // line_len
    assert log.dropped == 1000 - kept
    assert log.held_bytes == kept * line_len <= 32768

    stream.gate.set()
    log.close(timeout=5)
    ids = [orjson.loads(x)["request_id"] for x in stream.data.splitlines()]
    assert ids == [f"{i:08d}" for i in range(kept)]  # the oldest are kept, in order


def test_default_bound_is_one_mebibyte() -> None:
    stream = ListStream()
    stream.gate.clear()
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]
    for _ in range(MAX_BYTES // len(LINE) + 10):
        log.log(RECORD)
    assert log.dropped == 10
    assert log.held_bytes <= MAX_BYTES
    stream.gate.set()
    log.close(timeout=5)


def test_after_close_nothing_more_is_written() -> None:
    stream = ListStream()
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]
    log.log(RECORD)
    log.close()
    log.enabled = True  # as a config swap would
    log.log(RECORD)
    log.flush()
    assert not log.enabled
    assert stream.data == LINE


def test_disabled_log_does_nothing() -> None:
    stream = ListStream()
    log = AccessLog(False, stream, FakeLoop())  # type: ignore[arg-type]
    log.log(RECORD)
    log.flush()
    log.close()
    assert stream.data == b"" and log.dropped == 0


def test_unserializable_values_are_stringified_and_bad_records_dropped() -> None:
    stream = ListStream()
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]
    log.log({"upstream": ("10.0.0.1", 80), "obj": object.__new__(type("Peer", (), {}))})
    log.log({1: "non-string key"})  # orjson refuses it: dropped, not raised
    log.close()
    (line,) = stream.data.splitlines()
    parsed = json.loads(line)
    assert parsed["upstream"] == ["10.0.0.1", 80]
    assert parsed["obj"].startswith("<")
    assert log.dropped == 1


def test_short_writes_are_continued() -> None:
    stream = ListStream(max_write=7)
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]
    for i in range(3):
        log.log(record(i))
    log.close()
    assert [orjson.loads(x)["request_id"] for x in stream.data.splitlines()] == [
        "00000000",
        "00000001",
        "00000002",
    ]


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        AccessLog(True, ListStream(), flush_bytes=10, max_bytes=5)  # type: ignore[arg-type]


async def test_lines_reach_a_pipe_on_the_timer() -> None:
    r, w = os.pipe()
    reader = PipeReader(r)
    with open(w, "wb") as stream:
        log = AccessLog(True, stream)  # the running loop is found on first use
        records = [record(i) for i in range(3)]
        for rec in records:
            log.log(rec)
        assert log.timer_armed
        await wait_until(lambda: len(reader.lines()) == 3)
        assert [orjson.loads(x) for x in reader.lines()] == records
        assert not log.timer_armed
        log.close()
    reader.close()


async def test_a_pipe_passing_64k_is_written_before_the_timer() -> None:
    r, w = os.pipe()
    reader = PipeReader(r)
    with open(w, "wb") as stream:
        # A timer far away: only the size can have flushed.
        log = AccessLog(True, stream, flush_interval=3600)
        n = FLUSH_BYTES // len(LINE) + 1
        for i in range(n):
            log.log(record(i))
        assert not log.timer_armed
        await wait_until(lambda: len(reader.lines()) == n)
        log.close()
    reader.close()


async def test_a_closed_pipe_disables_the_log_with_one_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    r, w = os.pipe()
    os.close(r)  # nobody reads: writes fail with EPIPE
    with open(w, "wb") as stream:
        log = AccessLog(True, stream)
        log.log(RECORD)
        log.flush()
        assert log.wait_written(5)
        assert not log.enabled
        assert isinstance(log.error, BrokenPipeError)
        for _ in range(5):  # more lines and flushes: no more writes, no more messages
            log.log(RECORD)
            log.flush()
        log.enabled = True  # as a config swap does
        log.log(RECORD)
        log.flush()
        assert not log.enabled
        log.close()
    err = capsys.readouterr().err
    assert err.count("access log disabled") == 1
    assert "BrokenPipeError" in err


def test_a_closed_file_disables_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    r, w = os.pipe()
    os.close(r)
    stream = open(w, "wb")  # noqa: SIM115 - closed on purpose before the write
    stream.close()
    log = AccessLog(True, stream, FakeLoop())
    log.log(RECORD)
    log.flush()
    assert log.wait_written(5)
    assert not log.enabled and isinstance(log.error, ValueError)
    log.close()
    assert capsys.readouterr().err.count("access log disabled") == 1


# -- deferred lines: built when the batch leaves ------------------------------------


class Finished:
    """Stands for an exchange: its line is built from what it held when it ended."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.renders = 0

    def render(self, took: float) -> dict:
        self.renders += 1
        return {**record(self.i), "duration_ms": took}


def test_a_deferred_line_is_built_only_when_the_batch_leaves() -> None:
    loop, stream = FakeLoop(), ListStream()
    log = AccessLog(True, stream, loop)  # type: ignore[arg-type]
    ex = Finished(7)
    log.defer(ex.render, 1.5, 100)
    assert ex.renders == 0 and len(loop.live()) == 1  # queued, with the flush timer armed
    loop.fire()
    assert log.wait_written(5)
    assert ex.renders == 1
    (line,) = stream.data.splitlines()
    assert orjson.loads(line) == {**record(7), "duration_ms": 1.5}
    log.close()


def test_deferred_and_ready_lines_keep_their_order() -> None:
    stream = ListStream()
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]
    log.defer(Finished(0).render, 0.0, 100)
    log.log(record(1))  # a reject logged after it: the deferred line is built first
    log.defer(Finished(2).render, 0.0, 100)
    log.close()
    ids = [orjson.loads(x)["request_id"] for x in stream.data.splitlines()]
    assert ids == ["00000000", "00000001", "00000002"]


def test_at_most_defer_max_entries_wait() -> None:
    loop, stream = FakeLoop(), ListStream()
    log = AccessLog(True, stream, loop)  # type: ignore[arg-type]
    entries = [Finished(i) for i in range(DEFER_MAX)]
    for ex in entries[:-1]:
        log.defer(ex.render, 0.0, 100)
    assert all(ex.renders == 0 for ex in entries)
    log.defer(entries[-1].render, 0.0, 100)  # the one that reaches the bound flushes the batch
    assert all(ex.renders == 1 for ex in entries)
    assert loop.live() == []
    assert log.wait_written(5)
    assert len(stream.data.splitlines()) == DEFER_MAX
    log.close()


def test_what_deferred_entries_hold_is_bounded_in_bytes_too() -> None:
    loop, stream = FakeLoop(), ListStream()
    log = AccessLog(True, stream, loop)  # type: ignore[arg-type]
    big = [Finished(i) for i in range(3)]  # entries holding ~30 KB each (a long URL)
    log.defer(big[0].render, 0.0, 30_000)
    log.defer(big[1].render, 0.0, 30_000)
    assert [ex.renders for ex in big] == [0, 0, 0]  # 60,000 bytes wait: under 64 KiB
    log.defer(big[2].render, 0.0, 30_000)
    assert [ex.renders for ex in big] == [1, 1, 1]  # past 64 KiB: the batch left
    assert loop.live() == []
    log.close()
    assert len(stream.data.splitlines()) == 3


def test_a_failing_render_costs_its_line_only() -> None:
    stream = ListStream()
    log = AccessLog(True, stream, FakeLoop())  # type: ignore[arg-type]

    def broken(item: object) -> dict:
        raise KeyError("a bug in one line")

    log.defer(Finished(0).render, 0.0, 100)
    log.defer(broken, 0.0, 100)
    log.defer(Finished(2).render, 0.0, 100)
    log.close()
    ids = [orjson.loads(x)["request_id"] for x in stream.data.splitlines()]
    assert ids == ["00000000", "00000002"]
    assert log.dropped == 1


def test_deferred_lines_obey_the_byte_bound() -> None:
    stream = ListStream()
    stream.gate.clear()  # the reader stalls
    log = AccessLog(True, stream, FakeLoop(), flush_bytes=4096, max_bytes=32768)  # type: ignore[arg-type]
    line_len = len(orjson.dumps(Finished(0).render(0.0))) + 1
    for i in range(1000):
        log.defer(Finished(i).render, 0.0, 100)
    log.flush()
    kept = 32768 // line_len
    assert log.dropped == 1000 - kept
    assert log.held_bytes <= 32768
    stream.gate.set()
    log.close(timeout=5)
    assert len(stream.data.splitlines()) == kept


def test_disabled_log_defers_nothing() -> None:
    stream = ListStream()
    log = AccessLog(False, stream, FakeLoop())  # type: ignore[arg-type]
    ex = Finished(0)
    log.defer(ex.render, 0.0, 100)
    log.close()
    assert ex.renders == 0 and stream.data == b""
