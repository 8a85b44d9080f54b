"""Load balancers: which endpoint of a destination (or subset) takes the next attempt.

`make_balancer(lb, endpoints)` builds one `Balancer` per endpoint set;
`pick(hash_key, avoid)` is called once per attempt and returns an
`EndpointState` (None only when the set is empty). All algorithms honor
endpoint weights:

- least_request (default): power of two choices on requests in flight, as
  Envoy's default. The two candidates are drawn by weight (the second one
  distinct from the first); the one with fewer requests in flight wins and a
  tie goes to the first draw. So with no load the shares are exactly the
  weights, and under load the less busy of two wins. (With unequal weights
  Envoy leaves P2C for a weighted scheduler on weight / (active + 1)^bias;
  that score inside P2C would send every idle pick to the heavier of the two
  and overshoot its weight.)
- peak_ewma: the same two draws, compared on latency estimate * (active + 1)
  (Linkerd, from Finagle); see endpoints.py for the estimate.
- round_robin: smooth weighted round robin (nginx's): a heavy endpoint's
  turns are spread out, not bunched (a deadline heap, as Envoy's, when one
  period would be too long to precompute).
- random: weighted random.
- ring_hash: consistent hashing of the caller's key on a ring of virtual
  nodes (128 per unit of weight, placed by blake2b of the endpoint's address
  and replica number, so every process builds the same ring); no key falls
  back to weighted random.

Candidates, recomputed only when the endpoints' generation changes:
1. available endpoints (healthy and not ejected), unless fewer than
   `panic_threshold` percent of them are available, or none is: then all
   endpoints (Envoy's panic mode; ejection alone never blacks a service out).
   A `panic_threshold` of 0 turns panic off: with none available, no pick;
2. with `locality` and a `local_zone`, and not in panic: the available
   endpoints in that zone if there is at least one (no spill-over by
   capacity as Envoy's zone-aware routing does; all-or-nothing).
`avoid` (the endpoint a retry just failed on) is not returned when any other
candidate exists: first among the candidates, then, if locality narrowed
them to that one endpoint, among the rest of the available ones.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from functools import lru_cache
from hashlib import blake2b
from heapq import heapify, heapreplace
from math import gcd
from typing import TYPE_CHECKING

from lepton_mesh.proxy.outbound.endpoints import EndpointState, Generation

if TYPE_CHECKING:
    from lepton_mesh.policy.traffic import LoadBalancer

# Virtual nodes per unit of weight on the hash ring, and the most the ring
# may hold (past it every endpoint's count is scaled down, which moves some
# keys between survivors when the set changes).
RING_REPLICAS = 128
RING_MAX_SIZE = 65_536
# On the ring, walk past non-candidates' nodes while candidates hold at least
# this share of the weight; below it, build a ring of theirs only.
RING_WALK_SHARE = 0.25
# Smooth round robin runs nginx's O(n) step ahead for one period (sum of
# weights over their gcd) and replays it, while period * n stays under this
# (about a millisecond); beyond it, an O(log n) deadline heap.
RR_MAX_WORK = 50_000


class Balancer:
    """Candidate bookkeeping shared by all algorithms; subclasses implement `_choose`."""

    __slots__ = (
        # fixed at construction
        "_gen",
        "_gens",
        "_local_zone",
        "_locality",
        "_panic_threshold",
        "_rng",
        "endpoints",
        # recomputed when the generation moves
        "_cands",
        "_cum",
        "_index",
        "_n",
        "_seen",
        "_total",
        "_uniform",
        "_panic",
        "_wider",
    )

    algorithm = ""

    def __init__(
        self,
        lb: LoadBalancer,
        endpoints: Sequence[EndpointState],
        rng: random.Random,
        local_zone: str | None,
    ) -> None:
        self.endpoints: tuple[EndpointState, ...] = tuple(endpoints)
        self._rng = rng
        self._panic_threshold = float(lb.panic_threshold)
        self._locality = bool(lb.locality) and local_zone is not None
        self._local_zone = local_zone
        gens: list[Generation] = []
        for e in self.endpoints:
            if not any(g is e.generation for g in gens):
                gens.append(e.generation)
        # One table means one generation (the usual case, checked inline per
        # pick); states from several tables are summed (each only grows).
        self._gens = tuple(gens)
        self._gen = gens[0] if len(gens) == 1 else None
        self._seen = -1
        self._cands: tuple[EndpointState, ...] = ()
        self._wider: tuple[EndpointState, ...] = ()
        self._cum: list[int] = []
        self._index: dict[EndpointState, int] = {}
        self._n = 0
        self._total = 0
        self._uniform = True
        self._panic = False

    @property
    def panic(self) -> bool:
        """Whether the balancer is in panic mode (balancing over all endpoints) right now."""
        self._current()
        return self._panic

    @property
    def candidates(self) -> tuple[EndpointState, ...]:
        """The endpoints picks currently choose among."""
        self._current()
        return self._cands

    def _current(self) -> None:
        gen = self._gen
        version = gen.value if gen is not None else sum(g.value for g in self._gens)
        if version != self._seen:
            self._refresh(version)

    # -- the hot path ----------------------------------------------------------

    def pick(
        self, hash_key: bytes | None = None, avoid: EndpointState | None = None
    ) -> EndpointState | None:
        # _current() inline: this runs once per attempt.
        gen = self._gen
        version = gen.value if gen is not None else sum(g.value for g in self._gens)
        if version != self._seen:
            self._refresh(version)
        n = self._n
        if n == 0:
            return None
        if n == 1:
            only = self._cands[0]
            if only is avoid:
                return self._elsewhere(avoid)
            return only
        return self._choose(hash_key, avoid)

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        raise NotImplementedError

    def _draw(self) -> int:
        """A candidate index, by weight."""
        if self._uniform:
            return int(self._rng.random() * self._n)
        # hi=n-1 keeps a float rounding at the very top inside the table.
        return bisect_right(self._cum, self._rng.random() * self._total, 0, self._n - 1)

    def _draw_other(self, i: int) -> int:
        """A candidate index other than `i`, by weight (needs n >= 2)."""
        n = self._n
        if self._uniform:
            j = int(self._rng.random() * (n - 1))
            return j + 1 if j >= i else j
        cum = self._cum
        w = cum[i] - (cum[i - 1] if i else 0)
        r = self._rng.random() * (self._total - w)
        if r >= cum[i] - w:  # skip over i's segment
            r += w
        j = bisect_right(cum, r, 0, n - 1)
        return j if j != i else (i + 1) % n

    def _not(self, e: EndpointState, avoid: EndpointState | None) -> EndpointState:
        """`e`, unless it is `avoid`: then another candidate by weight."""
        if e is not avoid:
            return e
        return self._cands[self._draw_other(self._index[e])]

    def _elsewhere(self, avoid: EndpointState) -> EndpointState:
        """The only candidate is `avoid`: try the wider available set, by weight."""
        others = [e for e in self._wider if e is not avoid]
        if not others:
            return avoid
        r = self._rng.random() * sum(e.weight for e in others)
        for e in others:
            r -= e.weight
            if r < 0:
                return e
        return others[-1]

    # -- recomputed when health, ejection, weight or labels change -------------

    def _refresh(self, version: int) -> None:
        all_ = self.endpoints
        avail = tuple(e for e in all_ if e.available)
        # No endpoint at all is not panic: there is nothing to balance over.
        # A threshold of 0 never panics, even with none available: the pick is
        # then None and the request gets 503 no_healthy_endpoint (as Envoy's 0%).
        threshold = self._panic_threshold
        panic = (
            bool(all_)
            and threshold > 0
            and (not avail or len(avail) * 100.0 < threshold * len(all_))
        )
        self._panic = panic
        wider = all_ if panic else avail
        cands = wider
        if self._locality and not panic:
            local = tuple(e for e in avail if e.zone == self._local_zone)
            if local:
                cands = local
        self._cands = cands
        self._wider = wider
        self._n = len(cands)
        cum: list[int] = []
        total = 0
        for e in cands:
            total += e.weight
            cum.append(total)
        self._cum = cum
        self._total = total
        self._uniform = len({e.weight for e in cands}) <= 1
        self._index = {e: i for i, e in enumerate(cands)}
        self._seen = version
        self._rebuilt()

    def _rebuilt(self) -> None:
        """Hook: the candidate set was recomputed."""


class RandomBalancer(Balancer):
    __slots__ = ()
    algorithm = "random"

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        return self._not(self._cands[self._draw()], avoid)


class LeastRequestBalancer(Balancer):
    __slots__ = ()
    algorithm = "least_request"

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        i = self._draw()
        a = self._cands[i]
        b = self._cands[self._draw_other(i)]
        if a is avoid:
            return b
        if b is avoid:
            return a
        return b if b.active < a.active else a


class PeakEwmaBalancer(Balancer):
    __slots__ = ()
    algorithm = "peak_ewma"

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        i = self._draw()
        a = self._cands[i]
        b = self._cands[self._draw_other(i)]
        if a is avoid:
            return b
        if b is avoid:
            return a
        now = a.now()
        return b if b.cost(now) < a.cost(now) else a


class RoundRobinBalancer(Balancer):
    """Smooth weighted round robin (nginx's).

    Each step adds every candidate's weight to its running score, takes the
    highest (first on ties) and subtracts the total from it. Over a period of
    sum(weights)/gcd steps each endpoint comes up weight/gcd times, spread
    out. That O(n) step is run ahead for one period, stored, and replayed,
    when the period is short enough to build in about a millisecond. Past
    that (many endpoints with uneven weights) the sequence comes from an
    earliest-deadline-first heap instead (Envoy's weighted round robin: the
    k-th turn of an endpoint of weight w is due at k/w), O(log n) per pick,
    exact over each period as well. Either starts at a random point, so that
    sidecars do not all begin on the same endpoint.
    """

    __slots__ = ("_heap", "_pos", "_seq")
    algorithm = "round_robin"

    def _rebuilt(self) -> None:
        weights = [e.weight for e in self._cands]
        g = 0
        for w in weights:
            g = gcd(g, w)
        period = self._total // g if g else 0
        self._heap: list[tuple[float, int, int]] = []
        if period * self._n <= RR_MAX_WORK:
            self._seq = _smooth_sequence(weights, period)
            self._pos = int(self._rng.random() * period) if period else 0
            return
        self._seq = []
        # (due, endpoint index, turn): turn k of endpoint i is due at k / w_i,
        # computed fresh each time (no accumulated rounding), ties by index.
        self._heap = [(1 / w, i, 1) for i, w in enumerate(weights)]
        heapify(self._heap)
        for _ in range(int(self._rng.random() * min(period, 1024))):
            self._next_due()

    def _next_due(self) -> int:
        heap = self._heap
        _, i, turn = heap[0]
        heapreplace(heap, ((turn + 1) / self._cands[i].weight, i, turn + 1))
        return i

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        seq = self._seq
        if seq:
            pos = self._pos
            k = seq[pos]
            pos += 1
            self._pos = 0 if pos == len(seq) else pos
        else:
            k = self._next_due()
        return self._not(self._cands[k], avoid)


def _smooth_sequence(weights: list[int], period: int) -> list[int]:
    """One period of nginx's smooth weighted round robin, as candidate indexes."""
    total = sum(weights)
    scores = [0] * len(weights)
    seq: list[int] = []
    for _ in range(period):
        best = 0
        top = None
        for k, w in enumerate(weights):
            s = scores[k] + w
            scores[k] = s
            if top is None or s > top:
                top = s
                best = k
        scores[best] -= total
        seq.append(best)
    return seq


class RingHashBalancer(Balancer):
    """Consistent hashing over a ring of virtual nodes.

    The full ring holds every endpoint, available or not, and is rebuilt
    only when weights change. A key goes to the first node at or after its
    hash that belongs to a candidate. How that is found depends on how much
    of the ring the candidates hold:
    - all of it: the full ring, no check;
    - at least RING_WALK_SHARE of the weight: the full ring, stepping past
      non-candidates' nodes (on average fewer than 1/share steps);
    - less (locality narrowed to a small zone): a ring of the candidates'
      nodes only, merged from their own node lists.
    All three give the same answer; only the cost differs. A health change
    thus never rescans the whole ring.
    """

    __slots__ = ("_full", "_full_weights", "_hashes", "_nodes", "_owners", "_walk")
    algorithm = "ring_hash"

    def __init__(
        self,
        lb: LoadBalancer,
        endpoints: Sequence[EndpointState],
        rng: random.Random,
        local_zone: str | None,
    ) -> None:
        super().__init__(lb, endpoints, rng, local_zone)
        self._full_weights: tuple[int, ...] | None = None
        self._nodes: dict[EndpointState, tuple[int, ...]] = {}
        self._full: tuple[list[int], list[EndpointState]] = ([], [])
        self._hashes: list[int] = []
        self._owners: list[EndpointState] = []
        self._walk = False

    def _rebuilt(self) -> None:
        all_ = self.endpoints
        weights = tuple(e.weight for e in all_)
        if weights != self._full_weights:
            self._nodes = ring_nodes(all_)
            self._full = _merge(self._nodes, all_)
            self._full_weights = weights
        self._walk = False
        if self._n == len(all_):
            self._hashes, self._owners = self._full
        elif self._total >= RING_WALK_SHARE * sum(weights):
            self._hashes, self._owners = self._full
            self._walk = True
        else:
            self._hashes, self._owners = _merge(self._nodes, self._cands)

    def _choose(self, hash_key: bytes | None, avoid: EndpointState | None) -> EndpointState:
        if hash_key is None:
            return self._not(self._cands[self._draw()], avoid)
        hashes = self._hashes
        i = bisect_left(hashes, key_hash(hash_key))
        if i == len(hashes):
            i = 0
        owners = self._owners
        e = owners[i]
        if e is avoid or (self._walk and e not in self._index):
            # Clockwise to the next candidate that is not `avoid`: a retry of
            # the same key lands on the same second choice every time. One
            # exists: n >= 2 here.
            index = self._index
            size = len(owners)
            for step in range(1, size):
                e = owners[(i + step) % size]
                if e is not avoid and e in index:
                    break
        return e


def key_hash(key: bytes) -> int:
    """A position on the ring: stable across processes and runs (never `hash()`)."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "big")


@lru_cache(maxsize=4096)
def _node_hashes(label: str, count: int) -> tuple[int, ...]:
    """Positions of an endpoint's nodes; cached, as a config swap rebuilds every balancer."""
    return tuple(key_hash(f"{label}#{r}".encode()) for r in range(count))


def ring_nodes(endpoints: Sequence[EndpointState]) -> dict[EndpointState, tuple[int, ...]]:
    """Each endpoint's node positions on the ring.

    They depend only on its address and replica number (RING_REPLICAS per
    unit of weight), so adding or removing an endpoint leaves everyone
    else's nodes in place, unless the ring would exceed RING_MAX_SIZE and
    every count is scaled down.
    """
    want = RING_REPLICAS * sum(e.weight for e in endpoints)
    scale = min(1.0, RING_MAX_SIZE / want) if want else 1.0
    return {
        e: _node_hashes(str(e.address), max(1, round(RING_REPLICAS * e.weight * scale)))
        for e in endpoints
    }


def _merge(
    nodes: dict[EndpointState, tuple[int, ...]], endpoints: Sequence[EndpointState]
) -> tuple[list[int], list[EndpointState]]:
    """The sorted ring of `endpoints`' nodes: (positions, owner of each)."""
    hashes: list[int] = []
    owners: list[EndpointState] = []
    for e in endpoints:
        hs = nodes[e]
        hashes.extend(hs)
        owners.extend([e] * len(hs))
    # Sorting indexes by a C-level key is several times faster than sorting tuples.
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    return [hashes[j] for j in order], [owners[j] for j in order]


_ALGORITHMS: dict[str, type[Balancer]] = {
    cls.algorithm: cls
    for cls in (
        LeastRequestBalancer,
        PeakEwmaBalancer,
        RoundRobinBalancer,
        RandomBalancer,
        RingHashBalancer,
    )
}


def make_balancer(
    lb: LoadBalancer,
    endpoints: Sequence[EndpointState],
    *,
    rng: random.Random | None = None,
    local_zone: str | None = None,
) -> Balancer:
    """A balancer for `endpoints` as `lb` says. `rng` defaults to a fresh, OS-seeded one."""
    cls = _ALGORITHMS.get(lb.algorithm)
    if cls is None:
        raise ValueError(f"unknown load-balancing algorithm {lb.algorithm!r}")
    return cls(lb, endpoints, rng if rng is not None else random.Random(), local_zone)
