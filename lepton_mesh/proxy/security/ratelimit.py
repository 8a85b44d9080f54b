"""Local rate limiting on the inbound side: the service's `RateLimit` as the proxy runs it.

The arithmetic and the bounded bucket tables are policy's
(`security_decisions.LocalRateLimiter` over `TokenBucket`s with an explicit
`now`); this module adds what only the running sidecar has: the monotonic
clock, the buckets surviving config swaps (a limiter is built per snapshot
from the previous one, so unchanged limits keep their buckets), the 429
answer with `Retry-After`, and counters for `/config` and metrics.

Invariants:
- `Retry-After` is a whole number of seconds, at least 1 (RFC 9110 section 10.2.3
  allows no fractions), the ceiling of when the refusing bucket will have a
  token: a client that waits that long gets one (unless others take it).
- Every refused request is counted once, under the limit that refused it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from lepton_mesh.policy.security import RateLimit
from lepton_mesh.policy.security_decisions import AuthzRequest, LocalRateLimiter, RatePlan
from lepton_mesh.proxy.errors import ProxyError, Reason

MonoClock = Callable[[], float]


class RateLimitedError(ProxyError):
    """429 `rate_limited` with its Retry-After header."""

    __slots__ = ("limit",)

    def __init__(self, limit: str, key: str, retry_after: float) -> None:
        seconds = retry_after_seconds(retry_after)
        super().__init__(
            429,
            Reason.RATE_LIMITED,
            f"rate limit {limit!r} exceeded; retry in {seconds}s",
            headers=b"retry-after: %d\r\n" % seconds,
        )
        self.limit = limit


def retry_after_seconds(wait: float) -> int:
    return max(1, math.ceil(wait - 1e-9))


class RateLimitRuntime:
    """One snapshot's limiter; `limited` counts refusals by limit name and survives swaps."""

    __slots__ = ("clock", "limited", "limiter")

    def __init__(
        self,
        rate_limit: RateLimit,
        previous: RateLimitRuntime | None,
        clock: MonoClock = time.monotonic,
    ) -> None:
        self.limiter = LocalRateLimiter(
            rate_limit, previous.limiter if previous is not None else None
        )
        self.clock = clock
        self.limited: dict[str, int] = previous.limited if previous is not None else {}

    def plan(self, req: AuthzRequest) -> RatePlan:
        """The limits that select `req`, with its key values (reusable for requests alike)."""
        return self.limiter.plan(req)

    def take(self, plan: RatePlan) -> None:
        """Take a token from every limit in `plan`, or raise RateLimitedError."""
        decision = self.limiter.take(plan, self.clock())
        if decision.allowed:
            return
        name = decision.limit or "-"
        self.limited[name] = self.limited.get(name, 0) + 1
        raise RateLimitedError(name, decision.key or "", decision.retry_after)

    def describe(self) -> dict[str, Any]:
        rl = self.limiter.rate_limit
        return {
            "policy": f"{rl.namespace}/{rl.name}",
            "limits": [
                {
                    "name": rule.name,
                    "key": rule.key.kind
                    if rule.key.header is None
                    else f"header:{rule.key.header}",
                    "requests_per_second": rule.requests_per_second,
                    "burst": rule.burst,
                    "overrides": len(rule.overrides),
                    "limited_total": self.limited.get(rule.name, 0),
                }
                for rule in rl.limits
            ],
            "buckets": self.limiter.bucket_count(),
        }
