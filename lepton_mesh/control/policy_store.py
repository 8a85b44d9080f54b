"""Policies in etcd: validated, atomic applies, history and rollback.

Keys (docs/control-plane.md):

    /lepton/v1/policies/<kind>/<namespace>/<name>   a manifest, as applied
    /lepton/v1/policy-revision                      {"revision": N}
    /lepton/v1/history/<N, 12 digits>               the change record of revision N

Invariants:
- Every write is ONE etcd transaction that compares the policy-revision key's
  mod_revision with the one read, and puts/deletes the policy keys, the new
  revision and its history record together. So the stored set, the counter and
  the history never disagree, and two writers computed from the same state
  cannot both succeed (the loser gets 409, or is recomputed on fresh state when
  it gave no base revision).
- Before a write, the WHOLE resulting set is validated with the CLI's
  validator (`policy.manifest_set.resulting_set`, over `traffic_loader`):
  cross-object rules (one Route per destination, subsets that exist) hold for
  what is stored, not just for what was sent. Stored objects go first, so a
  conflict is reported on the object being applied, at its file and line.
- A write that changes nothing writes nothing (no revision, no record).
- Writes read the current state from etcd, never from the cache (which may
  lag); reads (`list`, `get`, `history`, `diff`) answer from the cache, so
  they keep working while etcd is down. After a write, the call returns once
  this replica's cache has caught up (bounded), so a read that follows sees it.
- A transaction whose outcome is unknown is resolved by looking for this
  write's own id in the history record it would have created.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson

from lepton_mesh.control.store import (
    Compare,
    Delete,
    Put,
    Store,
    StoreError,
    UnknownOutcome,
)
from lepton_mesh.control.watch_cache import WatchCache
from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.policy.manifest_set import (
    Change,
    Ident,
    as_documents,
    changes_between,
    kind_order,
    resulting_set,
    undo,
)
from lepton_mesh.policy.yaml_source import Document

__all__ = [
    "HISTORY_PREFIX",
    "POLICIES_PREFIX",
    "REVISION_KEY",
    "BadRequest",
    "HistoryCompacted",
    "PolicyError",
    "PolicyNotFound",
    "PolicyStore",
    "RevisionConflict",
    "TooLarge",
]

_log = logging.getLogger(__name__)

POLICIES_PREFIX = "/lepton/v1/policies/"
REVISION_KEY = "/lepton/v1/policy-revision"
HISTORY_PREFIX = "/lepton/v1/history/"
# One consistent read of every policy AND the revision counter: both keys
# start with this. (Two reads could straddle another writer's transaction.)
_STATE_PREFIX = "/lepton/v1/polic"

# etcd refuses transactions of more than --max-txn-ops operations (128 by
# default) and requests over --max-request-bytes (1.5 MiB): refuse earlier,
# with a message that says how to fix it. Two ops are the revision and record.
MAX_TXN_OPS = 128
MAX_CHANGES = MAX_TXN_OPS - 2
MAX_TXN_BYTES = 1_400_000
# Writers that gave no base revision are recomputed on fresh state when
# another write lands between their read and their transaction: with N
# writers at once, the last one needs N attempts. Between attempts, a short
# random pause (growing with the attempt) spreads the writers out.
_RACE_RETRIES = 20
_RACE_BACKOFF = 0.005
# How long a write waits for this replica's cache to show it.
_CACHE_CATCH_UP = 2.0


# --- errors ---------------------------------------------------------------------


class PolicyError(StoreError):
    """The resulting policy set would be invalid; `problems` says where and why."""

    status = 400
    reason = "invalid_policy"

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid policy")


class RevisionConflict(StoreError):
    """The policies changed since `base` (the revision the caller built on)."""

    status = 409
    reason = "revision_conflict"

    def __init__(self, detail: str, *, current: int, base: int | None) -> None:
        super().__init__(detail)
        self.current = current
        self.base = base


class PolicyNotFound(StoreError):
    status = 404
    reason = "not_found"


class BadRequest(StoreError):
    status = 400
    reason = "bad_request"


class TooLarge(StoreError):
    """More changes, or more bytes, than one etcd transaction may carry."""

    status = 413
    reason = "too_large"


class HistoryCompacted(StoreError):
    """A rollback needs history records that compaction removed."""

    status = 410
    reason = "history_compacted"


# --- keys and values ---------------------------------------------------------------


def policy_key(ident: Ident) -> str:
    kind, namespace, name = ident
    return f"{POLICIES_PREFIX}{kind}/{namespace}/{name}"


def history_key(revision: int) -> str:
    return f"{HISTORY_PREFIX}{revision:012d}"


def _ident_of_key(key: str) -> Ident | None:
    parts = key[len(POLICIES_PREFIX) :].split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def _dumps(value: Any) -> bytes:
    # Keys keep the order they were written in: `etcdctl get` and `lepton-mesh
    # diff` then show a manifest as its author wrote it. Equality (no-op
    # detection) compares parsed values, so order never counts as a change.
    return orjson.dumps(value)


def _loads(key: str, value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"{key}: stored value is not JSON ({e}); fix or delete it") from e


def _revision_of(value: bytes) -> int:
    rev = _loads(REVISION_KEY, value).get("revision")
    if not isinstance(rev, int):
        raise StoreError(f"{REVISION_KEY}: expected {{'revision': N}}")
    return rev


# --- planning: what a write changes, validated; pure -------------------------------


def plan(
    current: Mapping[Ident, dict[str, Any]],
    docs: Sequence[Document],
    *,
    prune: bool = False,
    delete: Iterable[Ident] = (),
    target: Mapping[Ident, dict[str, Any]] | None = None,
    origin: str = "live",
) -> list[Change]:
    """The changes a write makes, after validating the whole resulting set.

    As `manifest_set.resulting_set` (which `lepton-mesh validate` uses too),
    with its `ConfigError` as a `PolicyError`.
    """
    try:
        result = resulting_set(
            current, docs, prune=prune, delete=delete, target=target, origin=origin
        )
    except ConfigError as e:
        raise PolicyError(e.problems) from None
    return changes_between(current, result)


# --- the store ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    """The policies and counter as of one etcd read."""

    policies: dict[Ident, dict[str, Any]]
    revision: int  # the policy revision N
    revision_mod: int  # etcd mod_revision of the counter key (0: never written)


Planner = Callable[[_State], Awaitable[list[Change]]]


class PolicyStore:
    """Apply, delete, diff, history and rollback of policies, over `Store` and its cache."""

    def __init__(self, store: Store, cache: WatchCache) -> None:
        self._store = store
        self._cache = cache

    # --- reads: from the cache ---

    def revision(self) -> int:
        value = self._cache.items.get(REVISION_KEY)
        return 0 if value is None else _revision_of(value)

    def _cached(self) -> dict[Ident, dict[str, Any]]:
        out: dict[Ident, dict[str, Any]] = {}
        for key, value in self._cache.items.items():
            if key.startswith(POLICIES_PREFIX) and (ident := _ident_of_key(key)) is not None:
                out[ident] = _loads(key, value)
        return out

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        """Stored manifests, by kind, namespace and name."""
        items = self._cached()
        return [
            items[ident]
            for ident in sorted(items, key=kind_order)
            if (kind is None or ident[0] == kind) and (namespace is None or ident[1] == namespace)
        ]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        value = self._cache.items.get(policy_key((kind, namespace, name)))
        return None if value is None else _loads(policy_key((kind, namespace, name)), value)

    def diff(
        self, manifests: Sequence[Mapping[str, Any] | Document], *, prune: bool = False
    ) -> list[Change]:
        """What `apply` would change, against the cache; raises `PolicyError`. Writes nothing."""
        docs = as_documents(manifests)
        if prune and not docs:
            _refuse_empty_prune()
        return plan(self._cached(), docs, prune=prune)

    async def history(self, name: str | None = None, limit: int = 100) -> list[dict]:
        """Change records, newest first; with `name`, those that touched an object so named."""
        keys = sorted((k for k in self._cache.items if k.startswith(HISTORY_PREFIX)), reverse=True)
        out: list[dict] = []
        for key in keys:
            if len(out) >= limit:
                break
            record = _loads(key, self._cache.items[key])
            if name is None or any(ch.get("name") == name for ch in record.get("changes", ())):
                out.append(record)
        return out

    def record(self, revision: int) -> dict | None:
        value = self._cache.items.get(history_key(revision))
        return None if value is None else _loads(history_key(revision), value)

    # --- writes: read etcd, one transaction ---

    async def apply(
        self,
        manifests: Sequence[Mapping[str, Any] | Document],
        *,
        who: str,
        message: str = "",
        base_revision: int | None = None,
        dry_run: bool = False,
        prune: bool = False,
    ) -> dict:
        """Put `manifests` (and with `prune`, delete every other object) as one revision.

        Returns `{"revision", "changes", "dry_run"}`: the new revision, or the
        current one when nothing changed or for a dry run.
        """
        docs = as_documents(manifests)
        if prune and not docs:
            _refuse_empty_prune()

        async def planner(state: _State) -> list[Change]:
            return plan(state.policies, docs, prune=prune)

        return await self._write(
            planner, who=who, message=message, base_revision=base_revision, dry_run=dry_run
        )

    async def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        *,
        who: str,
        message: str = "",
        base_revision: int | None = None,
    ) -> dict:
        ident = (kind, namespace, name)

        async def planner(state: _State) -> list[Change]:
            if ident not in state.policies:
                raise PolicyNotFound(f"no {kind} {namespace}/{name}")
            return plan(state.policies, [], delete=[ident])

        return await self._write(planner, who=who, message=message, base_revision=base_revision)

    async def rollback(self, revision: int, *, who: str, message: str = "") -> dict:
        """Write a new revision whose state is the state at `revision`."""
        if revision < 0:
            raise BadRequest(f"revision must be 0 or more, found {revision}")

        async def planner(state: _State) -> list[Change]:
            if revision > state.revision:
                raise BadRequest(
                    f"revision {revision} does not exist: the current revision is {state.revision}"
                )
            records = await self._records(revision + 1, state.revision)
            target = undo(state.policies, records)
            changes = plan(state.policies, [], target=target, origin=f"revision {revision}:")
            if not _fits(changes):
                raise _rollback_too_large(revision, changes, state, records)
            return changes

        return await self._write(
            planner, who=who, message=message or f"rollback to {revision}", rollback_of=revision
        )

    async def compact_history(self, depth: int) -> int:
        """Keep the newest `depth` records; returns how many were removed. The leader runs it."""
        if depth < 1:
            raise ValueError(f"history depth must be at least 1, found {depth}")
        kvs, _ = await self._store.get_prefix(HISTORY_PREFIX)
        keys = sorted(kv.key for kv in kvs)
        doomed = keys[: max(0, len(keys) - depth)]
        for start in range(0, len(doomed), MAX_TXN_OPS):
            await self._store.txn([], [Delete(k) for k in doomed[start : start + MAX_TXN_OPS]])
        return len(doomed)

    # --- internals ---

    async def _read(self) -> _State:
        kvs, _ = await self._store.get_prefix(_STATE_PREFIX)
        policies: dict[Ident, dict[str, Any]] = {}
        revision = revision_mod = 0
        for kv in kvs:
            if kv.key == REVISION_KEY:
                revision, revision_mod = _revision_of(kv.value), kv.mod_revision
            elif kv.key.startswith(POLICIES_PREFIX) and (ident := _ident_of_key(kv.key)):
                policies[ident] = _loads(kv.key, kv.value)
        return _State(policies, revision, revision_mod)

    async def _records(self, first: int, last: int) -> list[dict]:
        """Records `last` down to `first`, all of them, or `HistoryCompacted`."""
        if first > last:
            return []
        kvs, _ = await self._store.get_prefix(HISTORY_PREFIX)
        by_rev = {int(kv.key[len(HISTORY_PREFIX) :]): kv for kv in kvs}
        missing = [r for r in range(first, last + 1) if r not in by_rev]
        if missing:
            raise HistoryCompacted(
                f"history before revision {max(missing) + 1} was compacted: "
                f"cannot undo revisions {first}..{last}"
            )
        return [_loads(by_rev[r].key, by_rev[r].value) for r in range(last, first - 1, -1)]

    async def _write(
        self,
        planner: Planner,
        *,
        who: str,
        message: str,
        base_revision: int | None = None,
        dry_run: bool = False,
        rollback_of: int | None = None,
    ) -> dict:
        if not who:
            raise BadRequest("a write must name who made it")
        write_id = uuid.uuid4().hex  # finds this write in history when its outcome is unknown
        # The revision read before the first transaction of unknown outcome: if
        # any of them landed, its record is after it.
        unknown_since: int | None = None
        unknown: UnknownOutcome | None = None  # the first one, while it is unresolved
        for attempt in range(_RACE_RETRIES):
            if attempt:
                await asyncio.sleep(random.uniform(0, _RACE_BACKOFF * attempt))  # retry backoff
            try:
                state = await self._read()
                if unknown_since is not None:
                    found = await self._find_write(write_id, unknown_since, state.revision)
                    if found is not None:
                        return _result(found["revision"], found["changes"])
                if base_revision is not None and base_revision > state.revision:
                    # Not a conflict (nobody changed anything since): a mistake.
                    raise BadRequest(
                        f"revision {base_revision} does not exist: "
                        f"the current revision is {state.revision}"
                    )
                if base_revision is not None and base_revision != state.revision:
                    raise _conflict(base_revision, state.revision)
                changes = await planner(state)  # a rollback reads history from etcd
            except StoreError as e:
                if unknown_since is None or e.status < 500:
                    raise
                # etcd stopped answering after a transaction of unknown outcome:
                # that one may have landed. Saying "unavailable" would make the
                # caller apply it again; "unknown outcome" tells it to check history.
                raise UnknownOutcome(
                    f"a transaction's outcome is unknown and etcd no longer answers ({e.detail}): "
                    f"check history for write {write_id} before applying again"
                ) from e
            if not changes:
                return _result(state.revision, changes, dry_run=dry_run)
            record = {
                "revision": state.revision + 1,
                "time": time.time(),
                "who": who,
                "message": message,
                "changes": changes,
                "rollback_of": rollback_of,
                "id": write_id,
            }
            ops = _ops(changes, record)  # a dry run is refused as the write would be
            if dry_run:
                return _result(state.revision, changes, dry_run=True)
            try:
                result = await self._store.txn([Compare.mod(REVISION_KEY, state.revision_mod)], ops)
            except UnknownOutcome as e:
                _log.warning("policy write %s: outcome unknown; re-reading to find out", write_id)
                if unknown_since is None:
                    unknown, unknown_since = e, state.revision
                continue
            if result.succeeded:
                await self._catch_up(result.revision)
                return _result(record["revision"], changes)
            if base_revision is not None and unknown_since is None:
                raise _conflict(base_revision, (await self._read()).revision)
            # Without a base revision, recompute on fresh state. After an unknown
            # outcome, the revision may have moved because that write landed late:
            # the next read looks for it before calling anything a conflict.
        if unknown is not None:
            raise unknown  # still cannot tell: 503, and the caller is told to check history
        raise RevisionConflict(
            f"the policies kept changing during this write ({_RACE_RETRIES} attempts); retry",
            current=self.revision(),
            base=base_revision,
        )

    async def _find_write(self, write_id: str, after: int, upto: int) -> dict | None:
        """This write's record, if it landed as one of revisions after+1..upto."""
        for rev in range(after + 1, upto + 1):
            kv = await self._store.get(history_key(rev))
            if kv is not None and (record := _loads(kv.key, kv.value)).get("id") == write_id:
                return record
        return None

    async def _catch_up(self, etcd_revision: int) -> None:
        try:
            await self._cache.wait_for_revision(etcd_revision, timeout=_CACHE_CATCH_UP)
        except TimeoutError:
            _log.warning("cache did not reach revision %d in time", etcd_revision)


def _result(revision: int, changes: list[Change], *, dry_run: bool = False) -> dict:
    return {"revision": revision, "changes": changes, "dry_run": dry_run}


def _conflict(base: int, current: int) -> RevisionConflict:
    return RevisionConflict(
        f"the policies are at revision {current}, not {base}: "
        "someone else applied a change since; review it (diff), then apply again",
        current=current,
        base=base,
    )


def _fits(changes: list[Change]) -> bool:
    """Whether one transaction can carry `changes` (with a record of about this size)."""
    record = {"revision": 0, "time": 0.0, "who": "", "message": "", "rollback_of": 0, "id": ""}
    try:
        _ops(changes, record | {"changes": changes})
    except TooLarge:
        return False
    return True


def _rollback_too_large(
    revision: int, changes: list[Change], state: _State, records: list[dict]
) -> TooLarge:
    """A rollback is never split into several transactions: sidecars would be
    sent states that never existed, and a failure midway would leave one
    stored. Name the first step instead: the oldest revision between the
    target and now whose state one transaction reaches (undoing one record
    always does: each was one transaction)."""
    states = [state.policies]  # states[i]: the state at revision state.revision - i
    for record in records:  # newest first
        states.append(undo(states[-1], [record]))
    step = state.revision - 1
    for back in range(len(states) - 1, 0, -1):  # from the target towards now
        if _fits(changes_between(state.policies, states[back])):
            step = state.revision - back
            break
    return TooLarge(
        f"rolling back to revision {revision} changes {len(changes)} objects; one transaction "
        f"carries at most {MAX_CHANGES} (etcd's --max-txn-ops is {MAX_TXN_OPS}) and about "
        f"{MAX_TXN_BYTES} bytes. A rollback is not split (sidecars would see states that never "
        f"existed): roll back in steps, each to a state that did. First `lepton-mesh rollback "
        f"{step}`, then `lepton-mesh rollback {revision}` again (it names the next step if one "
        "is still needed)"
    )


def _ops(changes: list[Change], record: dict[str, Any]) -> list[Put | Delete]:
    if len(changes) > MAX_CHANGES:
        raise TooLarge(
            f"{len(changes)} objects change, but one apply may change at most {MAX_CHANGES} "
            f"(etcd's --max-txn-ops is {MAX_TXN_OPS}); apply them in several parts"
        )
    ops: list[Put | Delete] = []
    for ch in changes:
        key = policy_key((ch["kind"], ch["namespace"], ch["name"]))
        ops.append(Delete(key) if ch["after"] is None else Put(key, _dumps(ch["after"])))
    ops.append(Put(REVISION_KEY, _dumps({"revision": record["revision"]})))
    ops.append(Put(history_key(record["revision"]), _dumps(record)))
    size = sum(len(op.key) + (len(op.value) if isinstance(op, Put) else 0) for op in ops)
    if size > MAX_TXN_BYTES:
        raise TooLarge(
            f"this change is {size} bytes with its history record; etcd takes at most "
            f"about {MAX_TXN_BYTES} in one transaction: apply it in several parts"
        )
    return ops


def _refuse_empty_prune() -> NoReturn:
    """Prune with no manifests: most likely an empty folder or a wrong path, not a
    wish to delete everything (diff refuses it as apply does: one answer for both)."""
    raise BadRequest(
        "prune with no manifests would delete every policy: refusing "
        "(to clear them all, roll back to revision 0: `lepton-mesh rollback 0`, "
        "which names the steps to take if there are too many for one transaction)"
    )
