"""The sidecar's access log: one JSON object per line, batched, bounded.

Hot path: `defer(render, item, size)` appends one pair; the line is built
(`render(item)` -> dict -> one `orjson.dumps`) when the batch leaves, in one
tight loop over up to `DEFER_MAX` entries. Measured in a running sidecar,
building and encoding a line per request inline cost ~15 us of a ~65 us
hop: cold caches between the many small steps of a request, not the encoder
(`orjson.dumps` is ~1 us in isolation; `json.dumps` ~7 us). `log(record)`
serializes a ready dict at once, for the rare lines (rejected requests).
Nothing is written per line.

Batches leave the buffer when it passes `flush_bytes` (64 KiB) or when a
`loop.call_later` timer fires (0.1 s). The timer is armed only while the
buffer is non-empty, so an idle sidecar has no timer and no sleeping task.

Writes happen on one writer thread, never on the event loop: stdout is
usually a pipe to a container runtime, and a slow or stalled reader would
otherwise block the whole proxy inside `write()`. The loop only hands a
joined batch over a queue.

Invariants:
- A deferred `item` holds only what no longer changes, and nothing large
  (not the connection: the log would keep closed connections' buffers
  alive); entries are rendered in order, before any line logged after them.
  At most `DEFER_MAX` wait, holding at most `flush_bytes` (as their `size`
  says) plus the last one.
- Bytes held = bytes in the buffer + bytes handed to the writer and not yet
  written. It never exceeds `max_bytes` (1 MiB): a line that would pass it is
  dropped and counted in `dropped`. Lines that cannot be serialized are
  dropped and counted the same way.
- `_handed` is only written by the loop thread and `_written` only by the
  writer thread, so their difference (bytes in flight) needs no lock.
- A failed write (closed pipe, closed file) disables the log for good with one
  message on stderr; the proxy keeps serving. Setting `enabled` again later
  (a config swap does) costs at most one batch before the next flush turns
  it off again; the same holds after `close()`.
- When disabled, `log()` costs one attribute check.
- The stream is the caller's: `close()` flushes it but does not close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson

FLUSH_BYTES = 64 * 1024
MAX_BYTES = 1024 * 1024
FLUSH_INTERVAL_S = 0.1
DEFER_MAX = 256  # deferred entries waiting: bounds what they keep alive

Render = Callable[[Any], dict[str, Any]]

_OPTIONS = orjson.OPT_APPEND_NEWLINE


class AccessLog:
    __slots__ = (
        "_buf",
        "_buffered",
        "_closed",
        "_cond",
        "_flush_bytes",
        "_handed",
        "_interval",
        "_later",
        "_later_bytes",
        "_loop",
        "_max_bytes",
        "_queue",
        "_stream",
        "_thread",
        "_timer",
        "_written",
        "dropped",
        "enabled",
        "error",
    )

    def __init__(
        self,
        enabled: bool,
        stream: BinaryIO | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        flush_bytes: int = FLUSH_BYTES,
        max_bytes: int = MAX_BYTES,
        flush_interval: float = FLUSH_INTERVAL_S,
    ) -> None:
        if not 0 < flush_bytes <= max_bytes:
            raise ValueError(f"need 0 < flush_bytes <= max_bytes, got {flush_bytes}, {max_bytes}")
        self.enabled = enabled
        self.dropped = 0
        self.error: BaseException | None = None
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._loop = loop
        self._flush_bytes = flush_bytes
        self._max_bytes = max_bytes
        self._interval = flush_interval
        # Loop-thread state: lines not yet handed over, their size, the timer.
        self._buf: list[bytes] = []
        self._later: list[tuple[Render, Any]] = []
        self._later_bytes = 0
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._handed = 0
        # Writer-thread state; `_cond` guards nothing the hot path reads, it only
        # lets `wait_written` sleep until `_written` moves.
        self._written = 0
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- hot path ------------------------------------------------------------

    def defer(self, render: Render, item: Any, size: int) -> None:
        """A line that `render(item)` builds when the batch leaves, not now.

        `size`: roughly the bytes `item` holds; deferred entries leave at
        `flush_bytes` of them too, so what waits stays bounded in bytes."""
        if not self.enabled:
            return
        later = self._later
        later.append((render, item))
        self._later_bytes += size
        if len(later) >= DEFER_MAX or self._later_bytes >= self._flush_bytes:
            self.flush()
        elif self._timer is None:
            self._arm()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._later:
            self._render_later()  # they came first
        if self._add(record) and self._buffered >= self._flush_bytes:
            self.flush()
        elif self._timer is None and self._buf:
            self._arm()

    def _add(self, record: dict[str, Any]) -> bool:
        """Serialize `record` into the buffer; False when it was dropped."""
        try:
            line = orjson.dumps(record, default=str, option=_OPTIONS)
        except orjson.JSONEncodeError:
            self.dropped += 1
            return False
        buffered = self._buffered + len(line)
        if buffered + self._handed - self._written > self._max_bytes:
            self.dropped += 1
            return False
        self._buf.append(line)
        self._buffered = buffered
        return True

    def _render_later(self) -> None:
        later = self._later
        self._later = []
        self._later_bytes = 0
        add = self._add
        for render, item in later:
            try:
                record = render(item)
            except Exception:  # a bug of ours in one line must not cost the batch
                self.dropped += 1
                continue
            add(record)

    # -- batching -------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        """Bytes buffered or handed to the writer and not yet written."""
        return self._buffered + self._handed - self._written

    @property
    def timer_armed(self) -> bool:
        return self._timer is not None

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread; does not wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._later:
            self._render_later()
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        if self.error is not None or self._closed:
            # The stream is gone or closed; these lines are lost. Someone may have
            # set `enabled` again (a config swap): undo that.
            self.enabled = False
            return
        self._handed += len(data)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lepton-access-log", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def wait_written(self, timeout: float) -> bool:
        """Block until every handed batch is written (or failed); False on timeout."""
        target = self._handed
        with self._cond:
            return self._cond.wait_for(
                lambda: self._written >= target or self.error is not None, timeout
            )

    def close(self, timeout: float = 1.0) -> None:
        """Flush, stop the writer (waiting up to `timeout`), and stop logging."""
        self.flush()
        self.enabled = False
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            # The non-raising lookup: without a loop this runs for every line.
            loop = self._loop = asyncio._get_running_loop()
            if loop is None:
                return  # no loop: lines leave on size, flush() or close()
        self._timer = loop.call_later(self._interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    # -- writer thread --------------------------------------------------------

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._write_all(data)
                except Exception as exc:  # anything the stream raises stops the log
                    self._fail(exc)
            with self._cond:
                self._written += len(data)
                self._cond.notify_all()

    def _write_all(self, data: bytes) -> None:
        stream = self._stream
        # Batches are already large: write a buffered stream's raw file directly.
        # Besides saving a copy, a failed write then leaves nothing behind in the
        # stream's buffer for its close (or interpreter exit) to fail on again.
        raw = getattr(stream, "raw", None)
        target = stream if raw is None else raw
        stream.flush()  # what others buffered in the stream goes first
        view = memoryview(data)
        while view:
            n = target.write(view)
            if n is None:
                # Only a non-blocking raw stream says "nothing written"; this thread
                # exists so that the stream may block, so that is a setup error.
                raise BlockingIOError("access log stream is non-blocking")
            view = view[n:]  # a raw stream may write part of it
        if raw is None:
            stream.flush()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.enabled = False
        with contextlib.suppress(Exception):
            sys.stderr.write(f"lepton-mesh: access log disabled, write failed: {exc!r}\n")
            sys.stderr.flush()
