"""Live state of upstream endpoints, shared by the balancer, the outlier detector and exchanges.

An `EndpointState` is the mutable twin of a config `Endpoint`: the config
says where it is, its weight, labels and registry health; the state adds what
the sidecar learns at run time (ejection, requests in flight, a latency
estimate). An `EndpointTable` keeps one state per address across config
swaps, so a new snapshot does not forget what the old one learned.

Invariants:
- Everything a balancer precomputes from (weight, labels, healthy, ejected)
  changes only through methods that bump the shared `Generation`; balancers
  compare its value to decide when to recompute, so a pick never sees a stale
  candidate set and never rebuilds one that has not changed.
- `active` and the latency estimate are read per pick and never cached.
- `begin()` and `end()` pair up once per request attempt; `active` never
  goes below zero even if a caller breaks that rule.
- Single-threaded: all of this runs on the event loop, no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from math import exp
from types import MappingProxyType

from lepton_mesh.policy.sidecar_config import Address, Endpoint

Clock = Callable[[], float]

# Peak-EWMA defaults, as linkerd2-proxy's: a new endpoint is assumed to
# answer in 30 ms, and the estimate decays with a 10 s time constant.
DEFAULT_RTT = 0.030
DEFAULT_DECAY = 10.0
# A failed attempt is recorded as at least twice the current estimate (and
# at least DEFAULT_RTT), capped here. Timing failures like successes (as
# tower's PeakEwma and Finagle do) makes an endpoint that fails fast look
# fast and draw traffic; doubling per failure pushes it away within a few
# failures, and one odd failure costs only ~decay*ln(2) s of preference.
FAILURE_PENALTY_CAP = 5.0

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


class Generation:
    """A counter shared by the endpoints of one table, bumped on any change a
    balancer precomputes from. Only ever grows."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


class EndpointState:
    """One upstream endpoint as the data plane sees it right now."""

    __slots__ = (
        # identity and config (change only through update/set_*; they bump `generation`)
        "_ejected",
        "_healthy",
        "_labels",
        "_weight",
        "address",
        "generation",
        # load, read per pick
        "active",
        "total",
        # peak-EWMA latency estimate: `_ewma` seconds as of `_stamp`
        "_clock",
        "_decay",
        "_default_rtt",
        "_ewma",
        "_stamp",
    )

    def __init__(
        self,
        address: Address,
        weight: int = 1,
        labels: Mapping[str, str] = _NO_LABELS,
        healthy: bool = True,
        *,
        clock: Clock = time.monotonic,
        decay: float = DEFAULT_DECAY,
        default_rtt: float = DEFAULT_RTT,
        generation: Generation | None = None,
        stamp: float | None = None,
    ) -> None:
        """`stamp` is when the default estimate was taken (default: now); a table
        gives all states it creates at once the same one, so their untried
        estimates tie exactly and P2C's tie rule (the weighted first draw) decides."""
        _check_weight(weight)
        if decay <= 0 or default_rtt <= 0:
            raise ValueError("decay and default_rtt must be positive")
        self.address = address
        self._weight = weight
        self._labels = labels
        self._healthy = healthy
        self._ejected = False
        self.generation = generation if generation is not None else Generation()
        self.active = 0
        self.total = 0
        self._clock = clock
        self._decay = decay
        self._default_rtt = default_rtt
        self._ewma = default_rtt
        self._stamp = clock() if stamp is None else stamp

    @classmethod
    def from_endpoint(
        cls, ep: Endpoint, *, clock: Clock = time.monotonic, generation: Generation | None = None
    ) -> EndpointState:
        return cls(ep.address, ep.weight, ep.labels, ep.healthy, clock=clock, generation=generation)

    def __repr__(self) -> str:
        flags = "" if self.available else (" ejected" if self._ejected else " unhealthy")
        return f"<EndpointState {self.address} w={self._weight} active={self.active}{flags}>"

    # -- config and health ---------------------------------------------------

    @property
    def weight(self) -> int:
        return self._weight

    @property
    def labels(self) -> Mapping[str, str]:
        return self._labels

    @property
    def zone(self) -> str | None:
        return self._labels.get("zone")

    @property
    def healthy(self) -> bool:
        """What the config or registry says."""
        return self._healthy

    @property
    def ejected(self) -> bool:
        """What outlier detection says."""
        return self._ejected

    @property
    def available(self) -> bool:
        return self._healthy and not self._ejected

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self.generation.bump()

    def set_ejected(self, ejected: bool) -> None:
        if ejected != self._ejected:
            self._ejected = ejected
            self.generation.bump()

    def update(self, weight: int, labels: Mapping[str, str], healthy: bool) -> bool:
        """Take new config values; bump the generation and return True if any changed."""
        _check_weight(weight)
        if weight == self._weight and healthy == self._healthy and labels == self._labels:
            return False
        self._weight = weight
        self._labels = labels
        self._healthy = healthy
        self.generation.bump()
        return True

    # -- load ----------------------------------------------------------------

    def begin(self) -> float:
        """A request attempt starts on this endpoint; returns its start time for `end`."""
        self.active += 1
        self.total += 1
        return self._clock()

    def end(self, started: float, ok: bool) -> None:
        """The attempt begun at `started` is over; feed its latency to the estimate.

        `ok=False` (connect failure, reset, gateway error) records a penalty
        latency instead when that is larger (see FAILURE_PENALTY_CAP).
        """
        if self.active > 0:
            self.active -= 1
        now = self._clock()
        sample = now - started if now > started else 0.0
        w = exp((self._stamp - now) / self._decay) if now > self._stamp else 1.0
        current = self._ewma * w
        if not ok:
            penalty = min(max(2.0 * current, self._default_rtt), FAILURE_PENALTY_CAP)
            if penalty > sample:
                sample = penalty
        # Peak: a sample above the current estimate replaces it at once;
        # otherwise blend in by the time since the last sample (Finagle's
        # unevenly spaced EWMA, where `current` already holds the decay).
        self._ewma = sample if sample > current else current + sample * (1.0 - w)
        self._stamp = now

    def latency(self, now: float | None = None) -> float:
        """The latency estimate in seconds at `now`.

        It decays towards zero while no sample arrives (as Finagle and tower
        do on every read), so an endpoint that was avoided for being slow is
        eventually tried again and can show it recovered.
        """
        if now is None:
            now = self._clock()
        if now <= self._stamp:
            return self._ewma
        return self._ewma * exp((self._stamp - now) / self._decay)

    def cost(self, now: float) -> float:
        """Peak-EWMA load: the latency estimate times (requests in flight + 1)."""
        ewma = self._ewma
        if now > self._stamp:
            ewma *= exp((self._stamp - now) / self._decay)
        return ewma * (self.active + 1)

    def now(self) -> float:
        return self._clock()


def _check_weight(weight: int) -> None:
    if weight < 1:
        raise ValueError(f"endpoint weight must be >= 1, got {weight}")


class EndpointTable:
    """The `EndpointState`s of one destination, keyed by address, kept across config swaps.

    All states of a table share one `Generation`, so a balancer over them
    checks one counter per pick.
    """

    __slots__ = ("_by_address", "_clock", "_decay", "_default_rtt", "generation")

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        decay: float = DEFAULT_DECAY,
        default_rtt: float = DEFAULT_RTT,
    ) -> None:
        self._by_address: dict[Address, EndpointState] = {}
        self._clock = clock
        self._decay = decay
        self._default_rtt = default_rtt
        self.generation = Generation()

    @property
    def version(self) -> int:
        """Grows whenever weight, labels, health or ejection of any endpoint changes,
        or the set of endpoints does."""
        return self.generation.value

    def sync(self, endpoints: Sequence[Endpoint]) -> list[EndpointState]:
        """Make the table match `endpoints`; return their states in the same order.

        Existing states keep their ejection, load and latency estimate and
        take the new weight, labels and health; new addresses get fresh
        states; addresses no longer listed are forgotten (requests still in
        flight on them keep their object). A repeated address keeps its first
        entry only.
        """
        old = self._by_address
        new: dict[Address, EndpointState] = {}
        now = self._clock()
        changed = False
        for ep in endpoints:
            if ep.address in new:
                continue
            state = old.get(ep.address)
            if state is None:
                state = EndpointState(
                    ep.address,
                    ep.weight,
                    ep.labels,
                    ep.healthy,
                    clock=self._clock,
                    decay=self._decay,
                    default_rtt=self._default_rtt,
                    generation=self.generation,
                    stamp=now,
                )
                changed = True
            elif state.update(ep.weight, ep.labels, ep.healthy):
                changed = True
            new[ep.address] = state
        if len(new) != len(old) or any(a not in new for a in old):
            changed = True
        self._by_address = new
        if changed:
            self.generation.bump()
        return list(new.values())

    def get(self, address: Address) -> EndpointState | None:
        return self._by_address.get(address)

    def __iter__(self) -> Iterator[EndpointState]:
        return iter(tuple(self._by_address.values()))

    def __len__(self) -> int:
        return len(self._by_address)
