"""A destination's circuit breaker: four counters against four limits.

As Envoy's per-cluster thresholds: connections (open to the destination's
endpoints), pending (requests waiting for a connection), requests (in
flight) and retries (in flight). A request that would go past a limit is
refused at once (the caller answers 503 `overflow`); nothing queues past a
limit. Each refusal counts in the limit's overflow counter.

Use:
- request: `try_acquire_request()` when it starts, `release_request()` when
  it ends (however it ends);
- waiting for a connection: `try_acquire_pending()` / `release_pending()`;
- retry: `try_acquire_retry()` before a retry attempt, `release_retry()`
  when that attempt ends. Take the retry slot before withdrawing from the
  retry budget (`RetryBudget.try_retry()`), so a refused slot never spends
  a budget token; if the budget then says no, release the slot;
- connections: `can_open_connection()` once before opening one (False is an
  overflow, as Envoy's upstream_cx_overflow: the request stays pending),
  then `connection_opened()` / `connection_closed()`.

Invariants and reasons:
- Counters never go negative. A release without its acquire is a caller bug:
  it raises `CircuitAccountingError` and leaves the counter at 0, so the
  limits stay honest even if the caller swallows the error.
- `update(limits)` swaps limits and keeps counters. A counter above a
  lowered limit refuses new acquisitions until it drains below it.
- Counters are plain ints on a `__slots__` object: the hot path is a compare
  and an add. Runs on the event-loop thread; no locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lepton_mesh.policy import traffic

# Limit names as metrics and the admin API spell them, in a fixed order.
LIMITS = ("connections", "pending", "requests", "retries")


class CircuitAccountingError(RuntimeError):
    """A release without a matching acquire: a bug in the caller."""


class CircuitBreaker:
    __slots__ = (
        "limits",
        # in use now
        "connections",
        "pending",
        "requests",
        "retries",
        # refusals since creation, per limit
        "connections_overflows",
        "pending_overflows",
        "requests_overflows",
        "retries_overflows",
    )

    def __init__(self, limits: traffic.CircuitLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.connections_overflows = 0
        self.pending_overflows = 0
        self.requests_overflows = 0
        self.retries_overflows = 0

    # -- requests ------------------------------------------------------------

    def try_acquire_request(self) -> bool:
        if self.requests >= self.limits.max_requests:
            self.requests_overflows += 1
            return False
        self.requests += 1
        return True

    def release_request(self) -> None:
        if self.requests <= 0:
            raise CircuitAccountingError("release_request() without try_acquire_request()")
        self.requests -= 1

    # -- pending (waiting for a connection) -----------------------------------

    def try_acquire_pending(self) -> bool:
        if self.pending >= self.limits.max_pending:
            self.pending_overflows += 1
            return False
        self.pending += 1
        return True

    def release_pending(self) -> None:
        if self.pending <= 0:
            raise CircuitAccountingError("release_pending() without try_acquire_pending()")
        self.pending -= 1

    # -- retries in flight ---------------------------------------------------

    def try_acquire_retry(self) -> bool:
        if self.retries >= self.limits.max_retries:
            self.retries_overflows += 1
            return False
        self.retries += 1
        return True

    def release_retry(self) -> None:
        if self.retries <= 0:
            raise CircuitAccountingError("release_retry() without try_acquire_retry()")
        self.retries -= 1

    # -- connections -----------------------------------------------------------

    def can_open_connection(self) -> bool:
        """Whether one more connection fits; a False counts as an overflow.

        Ask once per connection you would open, not to poll.
        """
        if self.connections >= self.limits.max_connections:
            self.connections_overflows += 1
            return False
        return True

    def connection_opened(self) -> None:
        """Count an open connection (after `can_open_connection()` said yes)."""
        self.connections += 1

    def connection_closed(self) -> None:
        if self.connections <= 0:
            raise CircuitAccountingError("connection_closed() without connection_opened()")
        self.connections -= 1

    # -- config swap and inspection -------------------------------------------

    def update(self, limits: traffic.CircuitLimits) -> None:
        """Swap in new limits; counters are kept."""
        self.limits = limits

    def open_limits(self) -> list[str]:
        """The limits at (or above) their max right now, in `LIMITS` order."""
        return [name for name, used, cap in self._rows() if used >= cap]

    def overflows(self) -> dict[str, int]:
        """Refusals since creation, per limit, in `LIMITS` order."""
        return {
            "connections": self.connections_overflows,
            "pending": self.pending_overflows,
            "requests": self.requests_overflows,
            "retries": self.retries_overflows,
        }

    def limit_states(self) -> list[tuple[str, bool, int]]:
        """`(limit, open now, overflows_total)` per limit, in `LIMITS` order (for metrics)."""
        overflows = self.overflows()
        return [(name, used >= cap, overflows[name]) for name, used, cap in self._rows()]

    def describe(self) -> dict[str, dict[str, int | bool]]:
        """Per limit: in use, max, open, overflows (for the admin `/clusters`)."""
        overflows = self.overflows()
        return {
            name: {"used": used, "max": cap, "open": used >= cap, "overflows": overflows[name]}
            for name, used, cap in self._rows()
        }

    def _rows(self) -> tuple[tuple[str, int, int], ...]:
        lim = self.limits
        return (
            ("connections", self.connections, lim.max_connections),
            ("pending", self.pending, lim.max_pending),
            ("requests", self.requests, lim.max_requests),
            ("retries", self.retries, lim.max_retries),
        )
