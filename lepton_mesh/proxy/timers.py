"""A per-connection deadline that costs a float store to move.

Keep-alive connections move their deadline on every request (idle -> reading
a head -> busy -> idle). Cancelling and re-arming a loop timer each time costs
more than the rest of the bookkeeping, so `Deadline` keeps at most one loop
handle: moving the deadline later only stores a number, and when the handle
fires early it re-arms itself for the new deadline. Moving it earlier re-arms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.when: float | None = None  # absolute loop time; None = disarmed

    def arm(self, delay: float) -> None:
        self.arm_at(self._loop.time() + delay)

    def arm_at(self, when: float) -> None:
        """Arm for absolute loop time `when` (as `arm`, without a delay to add)."""
        self.when = when
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(when, self._fire)
        elif handle.when() > when:
            handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def disarm(self) -> None:
        self.when = None  # the pending handle, if any, fires and finds nothing to do

    def cancel(self) -> None:
        """Disarm and drop the loop handle (on connection close)."""
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if when > self._loop.time():
            self._handle = self._loop.call_at(when, self._fire)
            return
        self.when = None
        self._callback()
