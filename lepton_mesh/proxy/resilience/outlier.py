"""Outlier detection: eject an endpoint after consecutive failures, for a while.

As Envoy's consecutive_5xx and consecutive_gateway_failure detectors, run
inline on each reported outcome (no sweep interval):
- "5xx": a 500-599 response. Adds to the 5xx count and, if it is not a
  gateway error, resets the gateway count (Envoy does the same).
- "gateway": a 502/503/504 response, a connect failure, a reset or a
  timeout. Adds to both counts (Envoy maps local-origin failures to 5xx
  unless told to split them; we never split).
- "success": anything else; resets both counts.
A count reaching its trigger (0 = that trigger is off) ejects the endpoint:
`endpoint.set_ejected(True)`, and a `loop.call_later` timer un-ejects it
`min(base_ejection_time * times_ejected, max_ejection_time)` later. No task
sleeps; the timer is cancelled if the endpoint goes away.

Rules, stated because they are choices:
- Max ejection percent: an ejection goes ahead only if after it
  `100 * ejected / known <= max_ejection_percent`, where `known` is the
  endpoints given to `set_endpoints()`: the percentage is a hard cap, as
  Envoy's since `always_eject_one_host` (default off). So with 50% the only
  endpoint of a service is never ejected, and one of two may be. A refused
  ejection counts in `ejections_overflow` and keeps the endpoint's counts,
  so its next failure tries again as soon as room frees up (Envoy resets
  the count and waits for a whole new run of failures).
- Counts are kept per address, so a config swap that rebuilds endpoint
  objects keeps them. Reports while an endpoint is ejected are ignored:
  they are the tail of the run that ejected it. Ejection resets its counts.
  Reports for addresses not in `set_endpoints()` are ignored (an in-flight
  request finishing after the endpoint was removed must not bring it back).
- Decay: `times_ejected` drops by one for each full `base_ejection_time` the
  endpoint spends back in service since it last returned (computed when
  read, no timer). It never grows past the count that reaches
  `max_ejection_time`, so decay from the cap takes bounded time.
- `update(config)` swaps thresholds and times; running ejections keep their
  end time. `update(None)` (detection disabled) returns every ejected
  endpoint now and forgets all counts.
- Runs on the event-loop thread; no locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from lepton_mesh.policy import traffic

Outcome = Literal["success", "5xx", "gateway"]


class Endpoint(Protocol):
    """What the detector needs of an endpoint (proxy.endpoints.EndpointState has it)."""

    @property
    def address(self) -> Hashable: ...  # an Address; str() of it names the endpoint

    @property
    def ejected(self) -> bool: ...

    def set_ejected(self, flag: bool) -> None: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """The two event-loop methods used: an asyncio loop, or a fake one in tests."""

    def time(self) -> float: ...

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> TimerHandle: ...


class _State:
    """One address's counts and ejection."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "endpoint",
        "ejected_until",  # loop time; None = in service
        "returned_at",  # loop time of the last return; None = ejected now or never
        "timer",
        "times_ejected",  # as of the last ejection; see _times_ejected() for decay
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.times_ejected = 0
        self.ejected_until: float | None = None
        self.returned_at: float | None = None
        self.timer: TimerHandle | None = None


class OutlierDetector:
    """One destination's detector. `config` None = detection off."""

    __slots__ = (
        "_ejected",
        "_loop",
        "_states",
        "config",
        "ejections_overflow",
        "ejections_total",
    )

    def __init__(self, config: traffic.OutlierDetection | None, loop: Loop) -> None:
        self.config = config
        self._loop = loop
        self._states: dict[Hashable, _State] = {}
        self._ejected = 0  # how many states have ejected_until set
        self.ejections_total = 0  # ejections carried out
        self.ejections_overflow = 0  # ejections refused by max_ejection_percent

    # -- hot path ------------------------------------------------------------

    def report(self, endpoint: Endpoint, outcome: Outcome) -> None:
        """Record one request's outcome at `endpoint`; may eject it."""
        config = self.config
        s = self._states.get(endpoint.address)
        if config is None or s is None:
            return
        if outcome == "success":
            s.consecutive_5xx = 0
            s.consecutive_gateway = 0
            return
        if s.ejected_until is not None:
            return
        if outcome == "gateway":
            s.consecutive_gateway += 1
        elif outcome == "5xx":
            s.consecutive_gateway = 0
        else:
            raise ValueError(f"unknown outcome {outcome!r}")
        s.consecutive_5xx += 1
        if (0 < config.consecutive_5xx <= s.consecutive_5xx) or (
            0 < config.consecutive_gateway_errors <= s.consecutive_gateway
        ):
            self._try_eject(config, s)

    # -- config swap -----------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The destination's endpoints now (on every endpoint or config swap).

        Counts and ejections carry over by address; an ejected address whose
        object was rebuilt is ejected on the new object too. Removed addresses
        are returned to service (in case their object is reused) and forgotten.
        """
        old = self._states
        new: dict[Hashable, _State] = {}
        for ep in endpoints:
            s = old.pop(ep.address, None) or new.get(ep.address)
            if s is None:
                s = _State(ep)
            elif s.endpoint is not ep:
                s.endpoint = ep
                if s.ejected_until is not None and not ep.ejected:
                    ep.set_ejected(True)
            new[ep.address] = s
        self._states = new
        for s in old.values():
            self._forget(s)

    def update(self, config: traffic.OutlierDetection | None) -> None:
        """Swap in a new config; None turns detection off and returns everyone."""
        self.config = config
        if config is None:
            for s in self._states.values():
                self._forget(s)
                s.consecutive_5xx = s.consecutive_gateway = s.times_ejected = 0
                s.returned_at = None

    def close(self) -> None:
        """Cancel every timer and return every ejected endpoint (detector teardown)."""
        for s in self._states.values():
            self._forget(s)
        self._states = {}

    # -- inspection ------------------------------------------------------------

    def currently_ejected(self) -> int:
        return self._ejected

    def endpoint_states(self) -> list[tuple[str, bool]]:
        """`(str(address), ejected)` per known endpoint, in `set_endpoints()` order (metrics)."""
        return [(str(addr), s.ejected_until is not None) for addr, s in self._states.items()]

    def describe(self, endpoint: Endpoint) -> dict[str, Any]:
        """The endpoint's outlier state for the admin `/clusters`.

        `ejected_until` is in loop time, `ejection_remaining` in seconds from
        now; both None while in service. `times_ejected` is after decay.
        """
        s = self._states.get(endpoint.address)
        if s is None:
            return {
                "tracked": False,
                "ejected": False,
                "consecutive_5xx": 0,
                "consecutive_gateway_errors": 0,
                "times_ejected": 0,
                "ejected_until": None,
                "ejection_remaining": None,
            }
        now = self._loop.time()
        until = s.ejected_until
        return {
            "tracked": True,
            "ejected": until is not None,
            "consecutive_5xx": s.consecutive_5xx,
            "consecutive_gateway_errors": s.consecutive_gateway,
            "times_ejected": self._times_ejected(s, now),
            "ejected_until": until,
            "ejection_remaining": None if until is None else max(0.0, until - now),
        }

    # -- internals -------------------------------------------------------------

    def _try_eject(self, config: traffic.OutlierDetection, s: _State) -> None:
        known = len(self._states)
        if 100.0 * (self._ejected + 1) / known > config.max_ejection_percent:
            self.ejections_overflow += 1
            return
        now = self._loop.time()
        base, cap = config.base_ejection_time, config.max_ejection_time
        max_times = max(1, math.ceil(cap / base)) if base > 0 else 1
        times = min(self._times_ejected(s, now) + 1, max_times)
        duration = max(0.0, min(base * times, cap))
        s.times_ejected = times
        s.ejected_until = now + duration
        s.returned_at = None  # decay counts from the coming return
        s.consecutive_5xx = s.consecutive_gateway = 0
        s.timer = self._loop.call_later(duration, self._return, s)
        self._ejected += 1
        self.ejections_total += 1
        s.endpoint.set_ejected(True)

    def _return(self, s: _State) -> None:
        """The ejection timer: back in service."""
        s.timer = None
        if s.ejected_until is None:
            return
        s.ejected_until = None
        s.returned_at = self._loop.time()
        self._ejected -= 1
        s.endpoint.set_ejected(False)

    def _forget(self, s: _State) -> None:
        """End `s`'s ejection now, if any, and drop its timer."""
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if s.ejected_until is not None:
            s.ejected_until = None
            self._ejected -= 1
            s.endpoint.set_ejected(False)

    def _times_ejected(self, s: _State, now: float) -> int:
        """`times_ejected` after decay: one less per full base time back in service."""
        config = self.config
        if s.returned_at is None or config is None or config.base_ejection_time <= 0:
            return s.times_ejected
        healthy = int((now - s.returned_at) // config.base_ejection_time)
        return max(0, s.times_ejected - healthy)
