"""The policy store against a real etcd: apply, validation, conflicts, history, rollback."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
import pytest

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.policy_store import (
    HISTORY_PREFIX,
    POLICIES_PREFIX,
    REVISION_KEY,
    BadRequest,
    HistoryCompacted,
    PolicyError,
    PolicyNotFound,
    PolicyStore,
    RevisionConflict,
    TooLarge,
)
from lepton_mesh.control.store import UnknownOutcome
from tests.policy_store.policy_support import Control, dest, docs, open_control, route


async def stored(ctl: Control) -> dict[str, dict]:
    """Everything under /lepton/v1/policies/, read from etcd (not the cache)."""
    kvs, _ = await ctl.store.get_prefix(POLICIES_PREFIX)
    return {kv.key[len(POLICIES_PREFIX) :]: orjson.loads(kv.value) for kv in kvs}


async def test_apply_writes_policies_revision_and_history_in_one_revision(control: Control) -> None:
    before = await control.store.revision()
    result = await control.policies.apply(docs(dest(), route()), who="alice", message="canary")
    assert result["revision"] == 1 and result["dry_run"] is False
    assert [(c["op"], c["kind"], c["name"], c["before"]) for c in result["changes"]] == [
        ("put", "Route", "dialog", None),
        ("put", "DestinationPolicy", "dialog", None),
    ]
    # One etcd transaction: one etcd revision for all four keys.
    kvs, _ = await control.store.get_prefix("/lepton/v1/")
    assert {kv.mod_revision for kv in kvs} == {before + 1}
    assert sorted(await stored(control)) == [
        "DestinationPolicy/default/dialog",
        "Route/default/dialog",
    ]
    raw = await control.store.get(POLICIES_PREFIX + "DestinationPolicy/default/dialog")
    assert raw is not None  # stored in the author's key order, for etcdctl and diffs
    assert raw.value.startswith(b'{"apiVersion":"lepton-mesh/v1","kind":"DestinationPolicy"')
    assert b'"spec":{"service":"dialog","subsets":' in raw.value
    record = control.policies.record(1)
    assert record is not None
    assert {k: record[k] for k in ("revision", "who", "message", "rollback_of")} == {
        "revision": 1,
        "who": "alice",
        "message": "canary",
        "rollback_of": None,
    }
    assert record["changes"] == result["changes"]
    # Reads come from the cache, which the apply waited for.
    assert control.policies.revision() == 1
    manifest = control.policies.get("Route", "default", "dialog")
    assert manifest is not None and manifest["metadata"] == {
        "name": "dialog",
        "namespace": "default",
    }
    assert [m["kind"] for m in control.policies.list()] == ["Route", "DestinationPolicy"]
    assert control.policies.list(kind="Route", namespace="other") == []


async def test_no_op_apply_writes_nothing(control: Control) -> None:
    await control.policies.apply(docs(dest(), route()), who="alice")
    etcd_revision = await control.store.revision()
    again = await control.policies.apply(docs(route(), dest()), who="bob", message="same")
    assert again == {"revision": 1, "changes": [], "dry_run": False}
    assert await control.store.revision() == etcd_revision
    assert len(await control.policies.history()) == 1


async def test_dry_run_reports_changes_and_writes_nothing(control: Control) -> None:
    etcd_revision = await control.store.revision()
    result = await control.policies.apply(docs(dest()), who="alice", dry_run=True)
    assert result["dry_run"] is True and result["revision"] == 0
    assert [c["op"] for c in result["changes"]] == ["put"]
    assert await control.store.revision() == etcd_revision


async def test_invalid_apply_names_file_line_field_and_stores_nothing(control: Control) -> None:
    etcd_revision = await control.store.revision()
    bad = dest().replace("timeout: 30s", "timeout: soon")
    with pytest.raises(PolicyError) as info:
        await control.policies.apply(docs(bad, source="dialog.yaml"), who="alice")
    err = info.value
    assert (err.status, err.reason) == (400, "invalid_policy")
    assert [str(p) for p in err.problems] == [
        "dialog.yaml:7: spec.timeout: expected a duration like '250ms', '1s', '5m', '1m30s' "
        "or a number of seconds, found string 'soon'"
    ]
    assert await control.store.revision() == etcd_revision
    assert await stored(control) == {}


async def test_the_whole_resulting_set_is_validated(control: Control) -> None:
    await control.policies.apply(docs(dest(subsets=("v1", "v2"))), who="alice")
    # A Route naming a subset the stored DestinationPolicy does not define.
    with pytest.raises(PolicyError) as info:
        await control.policies.apply(docs(route(subset="v3"), source="route.yaml"), who="alice")
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.path) == (
        "route.yaml",
        8,
        "spec.rules[0].backends[0].subset",
    )
    assert "subset 'v3' is not defined by DestinationPolicy 'dialog'" in problem.message
    assert "live DestinationPolicy/default/dialog" in problem.message
    # A second Route for the same destination, under another name: reported on the new one.
    await control.policies.apply(docs(route(subset="v2")), who="alice")
    with pytest.raises(PolicyError) as info:
        await control.policies.apply(docs(route(name="dialog-2"), source="r2.yaml"), who="a")
    (problem,) = info.value.problems
    assert (problem.file, problem.path) == ("r2.yaml", "spec.destination")
    # Removing the subset the stored Route uses is refused too; reported on the Route.
    with pytest.raises(PolicyError) as info:
        await control.policies.apply(docs(dest(subsets=("v1",))), who="alice")
    (problem,) = info.value.problems
    assert problem.file == "live Route/default/dialog"
    assert control.policies.revision() == 2


async def test_one_object_twice_in_a_bundle_is_refused(control: Control) -> None:
    with pytest.raises(PolicyError) as info:
        await control.policies.apply(docs(dest(), dest(timeout="5s"), source="d.yaml"), who="a")
    assert [str(p) for p in info.value.problems] == [
        "d.yaml:11: metadata.name: DestinationPolicy/default/dialog is also given at d.yaml:1: "
        "each object is set once"
    ]


async def test_plain_manifests_are_named_by_index(control: Control) -> None:
    manifest = docs(dest())[0].data
    manifest["spec"]["timeout"] = -1
    with pytest.raises(PolicyError) as info:
        await control.policies.apply([manifest], who="a")
    assert [str(p) for p in info.value.problems] == [
        "manifests[0]: spec.timeout: must be 0 or more, found -1"
    ]


async def test_base_revision_conflict(control: Control) -> None:
    await control.policies.apply(docs(dest()), who="alice")
    with pytest.raises(RevisionConflict) as info:
        await control.policies.apply(docs(dest(timeout="5s")), who="bob", base_revision=0)
    assert (info.value.status, info.value.reason, info.value.current) == (
        409,
        "revision_conflict",
        1,
    )
    done = await control.policies.apply(docs(dest(timeout="5s")), who="bob", base_revision=1)
    assert done["revision"] == 2


async def test_concurrent_applies_on_one_base_exactly_one_wins(control: Control, mesh_etcd) -> None:
    # Two replicas (two connections, two caches), five writers each, all from base 0.
    async with open_control(list(mesh_etcd.endpoints), wipe=False) as other:
        stores = [control.policies, other.policies] * 5
        results = await asyncio.gather(
            *(
                s.apply(docs(dest(timeout=f"{i + 1}s")), who=f"w{i}", base_revision=0)
                for i, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
    wins = [r for r in results if isinstance(r, dict)]
    conflicts = [r for r in results if isinstance(r, RevisionConflict)]
    assert (len(wins), len(conflicts)) == (1, 9), results
    assert wins[0]["revision"] == 1
    assert len(await control.policies.history()) == 1


async def test_concurrent_applies_without_base_all_land_in_order(
    control: Control, mesh_etcd
) -> None:
    async with open_control(list(mesh_etcd.endpoints), wipe=False) as other:
        stores = [control.policies, other.policies] * 3
        results = await asyncio.gather(
            *(s.apply(docs(dest(service=f"svc{i}")), who=f"w{i}") for i, s in enumerate(stores))
        )
    assert sorted(r["revision"] for r in results) == [1, 2, 3, 4, 5, 6]
    kvs, _ = await control.store.get_prefix(HISTORY_PREFIX)
    assert [orjson.loads(kv.value)["revision"] for kv in kvs] == [1, 2, 3, 4, 5, 6]
    assert len(await stored(control)) == 6


async def test_delete_and_prune(control: Control) -> None:
    await control.policies.apply(docs(dest("a"), dest("b"), dest("c")), who="alice")
    with pytest.raises(PolicyNotFound):
        await control.policies.delete("Route", "default", "a", who="alice")
    result = await control.policies.delete("DestinationPolicy", "default", "a", who="alice")
    assert [(c["op"], c["name"]) for c in result["changes"]] == [("delete", "a")]
    assert result["changes"][0]["before"]["spec"]["service"] == "a"
    result = await control.policies.apply(docs(dest("b")), who="alice", prune=True)
    assert [(c["op"], c["name"]) for c in result["changes"]] == [("delete", "c")]
    assert sorted(await stored(control)) == ["DestinationPolicy/default/b"]
    with pytest.raises(BadRequest, match="would delete every policy"):
        await control.policies.apply([], who="alice", prune=True)
    with pytest.raises(BadRequest, match="would delete every policy"):
        control.policies.diff([], prune=True)  # diff answers as apply would


async def test_deleting_what_a_route_needs_is_refused(control: Control) -> None:
    await control.policies.apply(docs(dest(), route()), who="alice")
    with pytest.raises(PolicyError) as info:
        await control.policies.delete("DestinationPolicy", "default", "dialog", who="alice")
    assert info.value.problems[0].file == "live Route/default/dialog"


async def test_rollback_restores_the_state_at_a_revision(control: Control) -> None:
    await control.policies.apply(docs(dest(), route(subset="v1")), who="alice")  # 1
    state_1 = await stored(control)
    await control.policies.apply(docs(route(subset="v2")), who="bob", message="v2")  # 2
    await control.policies.apply(docs(dest("intent")), who="carol")  # 3
    await control.policies.delete("Route", "default", "dialog", who="dave")  # 4
    result = await control.policies.rollback(1, who="erin")
    assert result["revision"] == 5
    assert await stored(control) == state_1
    record = control.policies.record(5)
    assert record is not None
    assert (record["who"], record["rollback_of"], record["message"]) == ("erin", 1, "rollback to 1")
    assert sorted((c["op"], c["kind"], c["name"]) for c in record["changes"]) == [
        ("delete", "DestinationPolicy", "intent"),
        ("put", "Route", "dialog"),
    ]
    # Rolling back to where we are changes nothing; to 0 empties the store.
    assert (await control.policies.rollback(5, who="erin"))["changes"] == []
    assert (await control.policies.rollback(0, who="erin"))["revision"] == 6
    assert await stored(control) == {}
    # And a rollback is itself undone by rolling back to the revision before it.
    await control.policies.rollback(5, who="erin")
    assert await stored(control) == state_1
    with pytest.raises(BadRequest, match="does not exist"):
        await control.policies.rollback(99, who="erin")


async def test_history_filters_by_name_newest_first(control: Control) -> None:
    await control.policies.apply(docs(dest("a")), who="alice")
    await control.policies.apply(docs(dest("b")), who="bob")
    await control.policies.apply(docs(dest("a", timeout="1s")), who="carol")
    assert [r["revision"] for r in await control.policies.history()] == [3, 2, 1]
    assert [r["who"] for r in await control.policies.history("a")] == ["carol", "alice"]
    assert [r["revision"] for r in await control.policies.history(limit=1)] == [3]
    assert await control.policies.history("nope") == []


async def test_compact_history_keeps_the_newest(control: Control) -> None:
    for i in range(5):
        await control.policies.apply(docs(dest(timeout=f"{i + 1}s")), who="alice")
    assert await control.policies.compact_history(2) == 3
    kvs, _ = await control.store.get_prefix(HISTORY_PREFIX)
    assert [kv.key[-2:] for kv in kvs] == ["04", "05"]
    with pytest.raises(HistoryCompacted) as info:
        await control.policies.rollback(2, who="alice")
    assert info.value.status == 410
    await control.policies.rollback(3, who="alice")  # undoes 5 and 4: still there
    assert await control.policies.compact_history(10) == 0


async def test_too_many_changes_is_refused_before_etcd(control: Control) -> None:
    many = docs(*(dest(f"s{i}") for i in range(127)))
    with pytest.raises(TooLarge, match="at most 126"):
        await control.policies.apply(many, who="alice")
    assert control.policies.revision() == 0


class _Flaky:
    """The real store, except that transactions report an unknown outcome.

    `applied` says whether such a transaction really went through first (the
    reply was lost) or never reached etcd; `times` how many trip (None: all).
    """

    def __init__(self, store, *, applied: bool, times: int | None = 1) -> None:
        self._store = store
        self._applied = applied
        self._times = times
        self.tripped = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def txn(self, compares, success, failure=()):
        if self._times is None or self.tripped < self._times:
            self.tripped += 1
            if self._applied:
                await self._store.txn(compares, success, failure)
            raise UnknownOutcome("etcd txn: DEADLINE_EXCEEDED; it may have been applied")
        return await self._store.txn(compares, success, failure)


@pytest.mark.parametrize("applied", [True, False], ids=["reply-lost", "never-sent"])
async def test_unknown_outcome_is_resolved_by_re_reading(control: Control, applied: bool) -> None:
    flaky = _Flaky(control.store, applied=applied)
    policies = PolicyStore(flaky, control.cache)  # type: ignore[arg-type]
    result = await policies.apply(docs(dest()), who="alice")
    assert flaky.tripped and result["revision"] == 1
    kvs, _ = await control.store.get_prefix(HISTORY_PREFIX)
    assert len(kvs) == 1  # applied exactly once either way
    rev = orjson.loads((await control.store.get(REVISION_KEY)).value)
    assert rev == {"revision": 1}


async def test_an_outcome_that_stays_unknown_is_reported_as_such(control: Control) -> None:
    flaky = _Flaky(control.store, applied=False, times=None)
    policies = PolicyStore(flaky, control.cache)  # type: ignore[arg-type]
    with pytest.raises(UnknownOutcome) as info:
        await policies.apply(docs(dest()), who="alice")
    assert (info.value.status, info.value.reason) == (503, "store_unknown_outcome")
    assert await stored(control) == {}


class _StallsAfterTxn(_Flaky):
    """The transaction really lands, then etcd stalls (SIGSTOP) before its answer:
    the store reports an unknown outcome, and the re-read that follows times out."""

    def __init__(self, store, etcd: LocalEtcd) -> None:
        super().__init__(store, applied=True)
        self._etcd = etcd

    async def txn(self, compares, success, failure=()):
        if self.tripped:
            return await self._store.txn(compares, success, failure)
        self.tripped += 1
        await self._store.txn(compares, success, failure)
        assert self._etcd.pid is not None
        os.kill(self._etcd.pid, signal.SIGSTOP)
        raise UnknownOutcome("etcd txn: DEADLINE_EXCEEDED; it may have been applied")


@pytest.mark.timeout(30)
async def test_a_write_that_landed_while_etcd_stalled_is_reported_unknown_not_unavailable(
    mesh_etcd: LocalEtcd,
) -> None:
    async with open_control(list(mesh_etcd.endpoints), timeout=0.5) as ctl:
        stalls = _StallsAfterTxn(ctl.store, mesh_etcd)
        policies = PolicyStore(stalls, ctl.cache)  # type: ignore[arg-type]
        assert mesh_etcd.pid is not None
        try:
            with pytest.raises(UnknownOutcome) as info:
                await policies.apply(docs(dest()), who="alice")
        finally:
            os.kill(mesh_etcd.pid, signal.SIGCONT)
        assert (info.value.status, info.value.reason) == (503, "store_unknown_outcome")
        assert "check history" in info.value.detail
        # It did land, once: a client told "unavailable" would have applied it again.
        kvs, _ = await ctl.store.get_prefix(HISTORY_PREFIX)
        assert len(kvs) == 1


async def test_a_dry_run_is_refused_as_the_write_would_be(control: Control) -> None:
    many = docs(*(dest(f"s{i}") for i in range(127)))
    with pytest.raises(TooLarge, match="at most 126") as info:
        await control.policies.apply(many, who="alice", dry_run=True)
    with pytest.raises(TooLarge) as real:
        await control.policies.apply(many, who="alice")
    assert info.value.detail == real.value.detail
    subsets = [{"name": f"v{j}", "labels": {"blob": "y" * 1000}} for j in range(40)]
    big = [
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "DestinationPolicy",
            "metadata": {"name": f"b{i}"},
            "spec": {"service": f"b{i}", "subsets": subsets},
        }
        for i in range(40)
    ]  # ~1.6 MB: over what one transaction carries
    with pytest.raises(TooLarge, match="bytes"):
        await control.policies.apply(big, who="alice", dry_run=True)
    assert control.policies.revision() == 0


async def test_a_rollback_too_large_for_one_transaction_names_the_steps(control: Control) -> None:
    await control.policies.apply(docs(*(dest(f"a{i}") for i in range(70))), who="alice")
    await control.policies.apply(docs(*(dest(f"b{i}") for i in range(70))), who="alice")
    with pytest.raises(TooLarge) as info:
        await control.policies.rollback(0, who="alice")
    assert "140 objects" in info.value.detail
    assert "`lepton-mesh rollback 1`, then `lepton-mesh rollback 0` again" in info.value.detail
    assert control.policies.revision() == 2
    # The steps it names work, and end where the rollback was meant to.
    await control.policies.rollback(1, who="alice")
    result = await control.policies.rollback(0, who="alice")
    assert result["revision"] == 4 and await stored(control) == {}


async def test_a_base_revision_past_the_current_one_is_a_bad_request(control: Control) -> None:
    for dry_run in (False, True):
        with pytest.raises(
            BadRequest, match="revision 9 does not exist: the current revision is 0"
        ):
            await control.policies.apply(docs(dest()), who="a", base_revision=9, dry_run=dry_run)
    with pytest.raises(RevisionConflict):  # a past one is still a conflict
        await control.policies.apply(docs(dest()), who="a", base_revision=0)
        await control.policies.apply(docs(dest(timeout="1s")), who="a", base_revision=0)
