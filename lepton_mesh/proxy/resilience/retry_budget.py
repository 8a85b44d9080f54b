"""A retry budget: retries may add at most `percent`% on top of requests.

Finagle's and Linkerd's token budget. Every original request deposits
`percent / 100` of a token; every retry withdraws one whole token; deposits
and withdrawals expire after `window` seconds. On top of the deposits a
constant reserve of `min_per_second * window` tokens is always there, so a
quiet service can still retry `min_per_second` times a second. A retry is
allowed while the balance (live deposits - live withdrawals + reserve) holds
at least one token.

Over any window, then, retries <= percent% of requests + min_per_second *
window: under a 100%-failing upstream the ratio retries / requests converges
to `percent / 100 + min_per_second / request_rate` and a retry storm cannot
amplify an outage by more than that.

Invariants and reasons:
- O(1) per call. The window is cut into `BUCKETS` time buckets held in a
  ring, plus their running total; moving to a later bucket clears the ones
  skipped (at most `BUCKETS` slots). No deque of timestamps.
- A deposit or withdrawal expires when its bucket is reused: between
  0.9 x window and 1 x window after it was made (Finagle's WindowedAdder
  has the same granularity).
- Tokens are integers in units of 1/SCALE of a retry, so 0.2 + 0.2 + 0.2 +
  0.2 + 0.2 is exactly one retry (float sums would land just below 1).
- A clock that steps backwards keeps using the current bucket; it never
  frees tokens early.
- Only original requests call `record_request()`; retries do not deposit.
- Runs on the event-loop thread; no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lepton_mesh.policy import traffic

BUCKETS = 10
# Token units per retry.
SCALE = 1_000_000


@dataclass(frozen=True, slots=True)
class RetryBudgetStats:
    """A snapshot for metrics and the admin API.

    `available` is how many retries would be allowed right now; the totals
    count since the budget was created.
    """

    available: int
    requests_total: int
    retries_total: int  # retries granted
    exhausted_total: int  # retries refused by the budget


class RetryBudget:
    """One destination's budget. `clock` returns seconds (monotonic)."""

    __slots__ = (
        # config, derived at construction and on update()
        "_deposit",
        "_reserve",
        "_width",
        "budget",
        # the window: a ring of per-bucket net token counts and their sum
        "_buckets",
        "_clock",
        "_epoch",
        "_total",
        # totals for stats()
        "_exhausted",
        "_requests",
        "_retries",
    )

    def __init__(
        self, budget: traffic.RetryBudget, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._requests = 0
        self._retries = 0
        self._exhausted = 0
        self._configure(budget)
        self._buckets = [0] * BUCKETS
        self._total = 0
        self._epoch = self._epoch_now()

    # -- hot path ------------------------------------------------------------

    def record_request(self) -> None:
        """Deposit for one original request (not for its retries)."""
        self._requests += 1
        self._advance()
        deposit = self._deposit
        self._buckets[self._epoch % BUCKETS] += deposit
        self._total += deposit

    def try_retry(self) -> bool:
        """Withdraw one retry; False when the budget is exhausted (nothing withdrawn)."""
        self._advance()
        if self._total + self._reserve < SCALE:
            self._exhausted += 1
            return False
        self._buckets[self._epoch % BUCKETS] -= SCALE
        self._total -= SCALE
        self._retries += 1
        return True

    # -- config swap and inspection -----------------------------------------

    def update(self, budget: traffic.RetryBudget) -> None:
        """Swap in a new config; the tokens in the window are kept.

        If the window length changes the ring is rebuilt and the net balance
        carried into the current bucket, so a swap neither grants a burst nor
        takes tokens away; it expires one new window from now.
        """
        old_width = self._width
        self._configure(budget)
        if self._width != old_width:
            self._buckets = [0] * BUCKETS
            self._epoch = self._epoch_now()
            self._buckets[self._epoch % BUCKETS] = self._total

    def stats(self) -> RetryBudgetStats:
        self._advance()
        return RetryBudgetStats(
            available=max(0, self._total + self._reserve) // SCALE,
            requests_total=self._requests,
            retries_total=self._retries,
            exhausted_total=self._exhausted,
        )

    # -- internals -----------------------------------------------------------

    def _configure(self, budget: traffic.RetryBudget) -> None:
        if not budget.window > 0:
            raise ValueError(f"retry budget window must be > 0 s, got {budget.window}")
        if budget.percent < 0 or budget.min_per_second < 0:
            raise ValueError(f"retry budget percent and min_per_second must be >= 0: {budget}")
        self.budget = budget
        self._deposit = round(budget.percent * SCALE / 100)
        self._reserve = round(budget.min_per_second * budget.window * SCALE)
        self._width = budget.window / BUCKETS

    def _epoch_now(self) -> int:
        """The absolute index of the bucket holding now."""
        return int(self._clock() // self._width)

    def _advance(self) -> None:
        epoch = self._epoch_now()
        if epoch > self._epoch:
            self._roll(epoch)

    def _roll(self, epoch: int) -> None:
        """Clear the buckets between the current one and `epoch`: they expired."""
        buckets = self._buckets
        if epoch - self._epoch >= BUCKETS:
            buckets[:] = [0] * BUCKETS
            self._total = 0
        else:
            for e in range(self._epoch + 1, epoch + 1):
                i = e % BUCKETS
                self._total -= buckets[i]
                buckets[i] = 0
        self._epoch = epoch
