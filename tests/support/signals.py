"""Children that must react to a signal the test sends them.

A background job of a non-interactive shell (`make test &`, `nohup`, some CI
runners) starts with SIGINT and SIGQUIT ignored, and exec keeps an ignored
signal ignored: Python then installs no KeyboardInterrupt handler, and a
sidecar leaves an ignored SIGQUIT alone, both rightly. A test that sends such
a signal must start its child with the signal at its default. A Python
handler becomes the default again across exec, so `not_ignored` installs one
that does nothing: this process goes on ignoring the signal, its children
do not.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

__all__ = ["not_ignored"]


def _still_ignored(signum: int, frame: object) -> None:
    """Here as ignored as before; in a child after exec, the default action."""


@contextlib.contextmanager
def not_ignored(*signals: signal.Signals) -> Iterator[None]:
    """Children spawned inside start with `signals` at their default action."""
    previous = {s: signal.getsignal(s) for s in signals}
    for s, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(s, _still_ignored)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
