"""Deterministic time for the resilience tests: a fake clock and a fake loop.

`FakeLoop` has the two methods the outlier detector uses (`time`,
`call_later`) plus `advance(dt)`, which runs every due timer in time order
with the clock set to the timer's own deadline. No test sleeps.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class FakeClock:
    """A settable `time.monotonic` stand-in."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._heap: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback, args)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def advance(self, dt: float) -> None:
        """Move time forward by `dt`, firing due timers at their own deadlines."""
        target = self.now + dt
        while self._heap and self._heap[0][0] <= target:
            when, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self.now = when
            timer.callback(*timer.args)
        self.now = target

    def advance_to(self, when: float) -> None:
        self.advance(when - self.now)

    def pending(self) -> list[float]:
        """Deadlines of the timers still armed, earliest first."""
        return sorted(when for when, _, t in self._heap if not t.cancelled)
