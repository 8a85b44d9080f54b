"""Errors the demo originates, each knowing its exit code and reason code.

The reason code is the short word printed next to the message (and greppable in
test output); the exit code is what `lepton-mesh demo` returns.
"""

from __future__ import annotations

import signal


class DemoError(Exception):
    """A failure that ends the demo with `exit_code` after everything is stopped."""

    exit_code = 1
    reason = "demo_failed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class MissingDependency(DemoError):
    reason = "missing_dependency"


class ChildExited(DemoError):
    """A child process exited while it was supposed to be serving."""

    reason = "child_exited"


class NotReady(DemoError):
    """A child did not pass its readiness probe before the deadline."""

    reason = "not_ready"


class PortTaken(DemoError):
    """A port the demo picked free was taken by another process before its child bound it."""

    reason = "port_taken"


class CommandFailed(DemoError):
    """A `lepton-mesh` command the demo runs (token, login, apply, rollback...) failed."""

    reason = "command_failed"


class PropagationTimeout(DemoError):
    """A change in the control daemon did not reach a sidecar before the deadline."""

    reason = "propagation_timeout"


class MissingExamples(DemoError):
    """The policy files the demo applies (examples/mesh/) are not where it looks."""

    reason = "missing_examples"


class TrafficFailed(DemoError):
    """The mesh did not carry the demo traffic well enough to call it working."""

    reason = "traffic_failed"


class MetricsUnavailable(DemoError):
    """A sidecar's admin /metrics could not be read."""

    reason = "metrics_unavailable"


class ProcessesLeft(DemoError):
    """Stopping left live processes behind: the one promise the demo must keep."""

    reason = "processes_left"


class Interrupted(DemoError):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) asked us to stop; exit 128 + signal number."""

    reason = "interrupted"

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum
