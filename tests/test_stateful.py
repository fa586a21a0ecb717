"""Stateful property test: random writes, transactions, savepoints and reopens against a dict model."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import localstore as ls

# -- the collections under test ------------------------------------------------------------

ITEMS = "items"  # Text key, most field types
NUMS = "nums"  # Integer key, a default and a non-nullable field
SCRATCH = "scratch"  # sync=False: rows but no change records


def declare(store: ls.Store) -> dict[str, ls.Collection]:
    """Declare (or redeclare) the three collections used by the machine."""
    return {
        ITEMS: store.collection(ITEMS, key="k", fields={
            "k": ls.Text(),
            "n": ls.Integer(index=True),
            "x": ls.Real(),
            "b": ls.Boolean(),
            "s": ls.Text(),
            "j": ls.Json(),
            "raw": ls.Blob(),
        }),
        NUMS: store.collection(NUMS, key="id", fields={
            "id": ls.Integer(),
            "v": ls.Text(default="zero"),
            "c": ls.Integer(nullable=False),
        }),
        SCRATCH: store.collection(SCRATCH, key="k", fields={"k": ls.Text(), "v": ls.Integer()}, sync=False),
    }


LOGGED = (ITEMS, NUMS)
ALL_FIELDS = {
    ITEMS: ("k", "n", "x", "b", "s", "j", "raw"),
    NUMS: ("id", "v", "c"),
    SCRATCH: ("k", "v"),
}
DEFAULTS: dict[str, dict[str, Any]] = {NUMS: {"v": "zero"}}
KEY_FIELD = {ITEMS: "k", NUMS: "id", SCRATCH: "k"}

# Small key spaces so that overwrites and deletes of existing rows are common.
item_keys = st.sampled_from(["a", "b", "c", "d", "é", "k\x00nul", "x" * 40, ""])
num_keys = st.integers(min_value=-3, max_value=4) | st.sampled_from([2**63 - 1, -(2**63)])
scratch_keys = st.sampled_from(["p", "q", "r"])

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value, None, or the field left out of the row (represented by _OMIT)."""
    return st.one_of(strategy, st.none(), st.just(_OMIT))


_OMIT = object()


@st.composite
def item_rows(draw: st.DrawFn) -> dict[str, Any]:
    values = {
        "k": draw(item_keys),
        "n": draw(optional(int64)),
        "x": draw(optional(st.floats(allow_nan=False))),
        "b": draw(optional(st.booleans())),
        "s": draw(optional(st.text(max_size=20))),
        "j": draw(optional(json_values)),
        "raw": draw(optional(st.binary(max_size=24))),
    }
    return {k: v for k, v in values.items() if v is not _OMIT}


@st.composite
def num_rows(draw: st.DrawFn) -> dict[str, Any]:
    row: dict[str, Any] = {"id": draw(num_keys), "c": draw(int64)}
    v = draw(optional(st.text(max_size=6)))
    if v is not _OMIT:
        row["v"] = v
    return row


@st.composite
def scratch_rows(draw: st.DrawFn) -> dict[str, Any]:
    return {"k": draw(scratch_keys), "v": draw(int64)}


ROWS = {ITEMS: item_rows(), NUMS: num_rows(), SCRATCH: scratch_rows()}
KEYS = {ITEMS: item_keys, NUMS: num_keys, SCRATCH: scratch_keys}
colls = st.sampled_from([ITEMS, NUMS, SCRATCH])


@st.composite
def ops(draw: st.DrawFn) -> tuple[Any, ...]:
    """One write: ("put", coll, row) | ("put_many", coll, rows) | ("delete", coll, key)."""
    coll = draw(colls)
    kind = draw(st.sampled_from(["put", "put", "put_many", "delete"]))
    if kind == "put":
        return ("put", coll, draw(ROWS[coll]))
    if kind == "put_many":
        return ("put_many", coll, draw(st.lists(ROWS[coll], min_size=0, max_size=5)))
    return ("delete", coll, draw(KEYS[coll]))


op_lists = st.lists(ops(), min_size=1, max_size=5)


class Boom(Exception):
    """Raised inside a transaction block to roll it back."""


# -- the model ---------------------------------------------------------------------------


@dataclass
class Entry:
    """One expected change record; ``seq`` is learnt from the store when the record is first seen."""

    coll: str
    key: Any
    op: str
    row: dict[str, Any] | None
    seq: int | None = None


@dataclass
class Model:
    """Rows by (collection, key), the expected change log in order, and the acknowledged watermark."""

    rows: dict[tuple[str, Any], dict[str, Any]] = field(default_factory=dict)
    log: list[Entry] = field(default_factory=list)

    def copy(self) -> Model:
        return Model(dict(self.rows), list(self.log))


def full_row(coll: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row as read back: every declared field, defaults applied, missing nullable fields None."""
    defaults = DEFAULTS.get(coll, {})
    return {f: row.get(f, defaults.get(f)) for f in ALL_FIELDS[coll]}


def strict_equal(a: Any, b: Any) -> bool:
    """Equality that also requires the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def rows_equal(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return strict_equal(a, b)


def apply_op(op: tuple[Any, ...], collections: dict[str, ls.Collection], model: Model) -> None:
    """Apply one write to the store and the model, checking the API's return value."""
    kind, coll = op[0], op[1]
    c = collections[coll]
    if kind == "put":
        row = op[2]
        assert c.put(row) == row[KEY_FIELD[coll]]
        written = full_row(coll, row)
        model.rows[(coll, row[KEY_FIELD[coll]])] = written
        if coll in LOGGED:
            model.log.append(Entry(coll, row[KEY_FIELD[coll]], "put", written))
    elif kind == "put_many":
        rows = op[2]
        assert c.put_many(rows) == len(rows)
        for row in rows:
            written = full_row(coll, row)
            model.rows[(coll, row[KEY_FIELD[coll]])] = written
            if coll in LOGGED:
                model.log.append(Entry(coll, row[KEY_FIELD[coll]], "put", written))
    else:
        key = op[2]
        existed = (coll, key) in model.rows
        assert c.delete(key) is existed, f"delete({key!r}) on {coll}"
        if existed:
            del model.rows[(coll, key)]
            if coll in LOGGED:
                model.log.append(Entry(coll, key, "delete", None))
    # Inside a transaction the block sees its own writes.
    key = op[2][KEY_FIELD[coll]] if kind == "put" else (op[2] if kind == "delete" else None)
    if key is not None:
        assert rows_equal(c.get(key), model.rows.get((coll, key)))


# -- the machine -------------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Drives one store file through random operations and compares it with ``Model`` after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ls-stateful-"))
        self.path = self.dir / "agent.db"
        self.store: ls.Store | None = None
        self.colls: dict[str, ls.Collection] = {}
        self.model = Model()
        self.store_id = ""
        self.last_seq = 0
        self.max_hlc = 0
        self.watermark = 0
        self.pruned = False

    @initialize()
    def open_store(self) -> None:
        self.store = ls.open(self.path)
        self.store_id = self.store.id
        self.colls = declare(self.store)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules --------------------------------------------------------------------------

    @rule(op=ops())
    def single_write(self, op: tuple[Any, ...]) -> None:
        apply_op(op, self.colls, self.model)

    @rule(coll=colls, data=st.data())
    def put_many_invalid_is_all_or_none(self, coll: str, data: st.DataObject) -> None:
        rows = data.draw(st.lists(ROWS[coll], max_size=4))
        bad_at = data.draw(st.integers(0, len(rows)))
        rows.insert(bad_at, {KEY_FIELD[coll]: None})  # a row without a key
        with pytest.raises(ls.ValidationError):
            self.colls[coll].put_many(rows)

    @rule(batch=op_lists)
    def transaction(self, batch: list[tuple[Any, ...]]) -> None:
        assert self.store is not None
        work = self.model.copy()
        with self.store.transaction():
            for op in batch:
                apply_op(op, self.colls, work)
        self.model = work

    @rule(batch=op_lists)
    def rollback(self, batch: list[tuple[Any, ...]]) -> None:
        assert self.store is not None
        work = self.model.copy()
        with pytest.raises(Boom), self.store.transaction():
            for op in batch:
                apply_op(op, self.colls, work)
            raise Boom()
        assert not self.store.in_transaction

    @rule(before=op_lists, inner=op_lists, after=st.lists(ops(), max_size=3), inner_commits=st.booleans())
    def nested_savepoint(
        self,
        before: list[tuple[Any, ...]],
        inner: list[tuple[Any, ...]],
        after: list[tuple[Any, ...]],
        inner_commits: bool,
    ) -> None:
        assert self.store is not None
        work = self.model.copy()
        with self.store.transaction():
            for op in before:
                apply_op(op, self.colls, work)
            inner_work = work.copy()
            try:
                with self.store.transaction():
                    for op in inner:
                        apply_op(op, self.colls, inner_work)
                    if not inner_commits:
                        raise Boom()
            except Boom:
                pass
            else:
                work = inner_work
            assert self.store.in_transaction
            # After rolling back to the savepoint, the outer block sees its own state again,
            # in its rows and in its change log.
            for (coll, key), row in work.rows.items():
                assert rows_equal(self.colls[coll].get(key), row)
            pending = self.store.changelog.changes(self.last_seq, limit=1_000)
            expected = [(e.coll, e.key, e.op) for e in work.log if e.seq is None]
            assert [(c.collection, c.key, c.op) for c in pending] == expected
            for op in after:
                apply_op(op, self.colls, work)
        self.model = work

    @rule(before=op_lists, inner=op_lists)
    def savepoint_then_outer_rollback(self, before: list[tuple[Any, ...]], inner: list[tuple[Any, ...]]) -> None:
        assert self.store is not None
        work = self.model.copy()
        with pytest.raises(Boom), self.store.transaction():
            for op in before:
                apply_op(op, self.colls, work)
            with self.store.transaction():
                for op in inner:
                    apply_op(op, self.colls, work)
            raise Boom()

    @rule(data=st.data())
    def ack_and_prune(self, data: st.DataObject) -> None:
        assert self.store is not None
        log = self.store.changelog
        known = [e.seq for e in self.model.log if e.seq is not None]
        with pytest.raises(ls.ChangeLogError):
            log.ack(self.last_seq + 1)
        if known:
            seq = data.draw(st.sampled_from(known), label="ack")
            assert log.ack(seq) == max(seq, self.watermark)
            self.watermark = max(seq, self.watermark)
        keep = data.draw(st.integers(0, 6), label="keep")
        expected = [e for e in self.model.log if e.seq is not None and e.seq <= self.watermark - keep]
        assert log.prune(keep) == len(expected)
        if expected:
            self.pruned = True
            self.model.log = [e for e in self.model.log if e not in expected]

    @rule(batch=st.lists(ops(), max_size=3), new_collection=st.booleans())
    def rolled_back_declaration(self, batch: list[tuple[Any, ...]], new_collection: bool) -> None:
        """Declare a new collection or add a field inside a transaction that is rolled back; nothing remains."""
        assert self.store is not None
        work = self.model.copy()
        with pytest.raises(Boom), self.store.transaction():
            for op in batch:
                apply_op(op, self.colls, work)
            if new_collection:
                tmp = self.store.collection("tmp", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
                tmp.put({"k": "t", "v": 1})
            else:
                wider = self.store.collection(NUMS, key="id", fields={
                    "id": ls.Integer(), "v": ls.Text(default="zero"), "c": ls.Integer(nullable=False),
                    "extra": ls.Text(),
                })
                wider.put({"id": 0, "c": 0, "extra": "gone"})
            raise Boom()
        assert set(self.store.collections()) == {ITEMS, NUMS, SCRATCH}
        with pytest.raises(ls.UnknownCollectionError):
            self.store.collection("tmp")
        with pytest.raises(ls.ValidationError):
            self.colls[NUMS].put({"id": 0, "c": 0, "extra": "gone"})

    @rule()
    def reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self.store = ls.open(self.path)
        assert self.store.id == self.store_id
        assert set(self.store.collections()) == {ITEMS, NUMS, SCRATCH}
        self.colls = {name: self.store.collection(name) for name in (ITEMS, NUMS, SCRATCH)}

    @rule()
    def reopen_and_redeclare(self) -> None:
        assert self.store is not None
        self.store.close()
        self.store = ls.open(self.path)
        self.colls = declare(self.store)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def rows_match_model(self) -> None:
        if self.store is None:
            return
        for name, c in self.colls.items():
            found = {row[KEY_FIELD[name]]: row for row in c.find()}
            expected = {key: row for (coll, key), row in self.model.rows.items() if coll == name}
            assert found.keys() == expected.keys(), name
            for key, row in expected.items():
                assert rows_equal(found[key], row), (name, key, found[key], row)
            assert c.count() == len(expected)

    @invariant()
    def change_log_matches_model(self) -> None:
        if self.store is None:
            return
        log = self.store.changelog
        changes: list[ls.Change] = []
        after = 0
        for _ in range(1000):
            batch = log.changes(after, limit=50)
            if not batch:
                break
            changes += batch
            after = batch[-1].seq
        seqs = [c.seq for c in changes]
        assert seqs == sorted(set(seqs)), "seqs must be unique and increasing"
        hlcs = [c.hlc for c in changes]
        assert all(a < b for a, b in pairwise(hlcs)), "HLCs must increase with seq"
        assert len(changes) == len(self.model.log), (changes, self.model.log)
        fresh = 0
        for change, entry in zip(changes, self.model.log):
            assert (change.collection, change.key, change.op) == (entry.coll, entry.key, entry.op), (change, entry)
            if entry.op == "delete":
                assert change.payload is None
            else:
                assert change.payload is not None
                assert rows_equal(self.colls[entry.coll].decode_payload(change.payload), entry.row), (change, entry)
            if entry.seq is None:
                # Written by the last step: after everything seen before, in seq and in HLC.
                entry.seq = change.seq
                assert change.seq > self.last_seq, (change, self.last_seq)
                assert change.hlc > self.max_hlc, (change, self.max_hlc)
                fresh += 1
            else:
                assert change.seq == entry.seq, (change, entry)
        assert SCRATCH not in {c.collection for c in changes}
        # The newest record of each key agrees with the key's presence.
        newest: dict[tuple[str, Any], str] = {}
        for change in changes:
            newest[(change.collection, change.key)] = change.op
        for (coll, key), op in newest.items():
            assert (op == "put") == ((coll, key) in self.model.rows), (coll, key, op)
        if not self.pruned:
            for coll, key in self.model.rows:
                if coll in LOGGED:
                    assert newest.get((coll, key)) == "put", (coll, key)
        # last_seq never goes back (not even when pruning) and moves whenever records were appended.
        last = log.last_seq()
        if seqs:
            assert last == seqs[-1] or (not fresh and last == self.last_seq)
        if fresh:
            assert last > self.last_seq
        else:
            assert last == self.last_seq
        self.last_seq = last
        self.max_hlc = max([self.max_hlc, *hlcs])
        assert log.watermark() == self.watermark
        assert log.pending() == sum(1 for s in seqs if s > self.watermark)

    @invariant()
    def verify_ok(self) -> None:
        if self.store is None:
            return
        report = self.store.verify()
        assert report.ok, str(report)
        assert report.store_id == self.store_id
        assert not self.store.in_transaction


def test_verify_after_pruning_the_whole_log(store: ls.Store) -> None:
    """A store whose change log was fully acknowledged and pruned is still healthy."""
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "n": ls.Integer()})
    coll.put({"k": "a", "n": 1})
    coll.put({"k": "b", "n": 2})
    log = store.changelog
    log.ack(log.last_seq())
    assert log.prune(keep=0) == 2
    report = store.verify()
    assert report.ok, str(report)


def test_verify_inside_a_transaction(store: ls.Store) -> None:
    """verify() works inside a transaction block, as changelog.changes() does."""
    coll = store.collection("c", key="k", fields={"k": ls.Text()})
    with store.transaction():
        coll.put({"k": "a"})
        report = store.verify()
    assert report.ok, str(report)


def _declare_c(store: ls.Store, *extra: str) -> ls.Collection:
    fields: dict[str, Any] = {"k": ls.Text(), "n": ls.Integer()}
    fields.update({name: ls.Text() for name in extra})
    return store.collection("c", key="k", fields=fields)


def test_savepoint_rollback_of_an_added_field(store: ls.Store) -> None:
    """A field added inside a rolled-back savepoint is gone at once, for the rest of the outer transaction too."""
    coll = _declare_c(store)
    coll.put({"k": "a", "n": 1})
    with store.transaction():
        try:
            with store.transaction():
                _declare_c(store, "extra").put({"k": "b", "n": 2, "extra": "x"})
                raise Boom()
        except Boom:
            pass
        coll.put({"k": "c", "n": 3})
        with pytest.raises(ls.ValidationError):
            coll.put({"k": "d", "n": 4, "extra": "y"})
    assert coll.find() == [{"k": "a", "n": 1}, {"k": "c", "n": 3}]
    assert store.verify().ok


def test_savepoint_rollback_of_a_new_collection(store: ls.Store) -> None:
    """A collection declared inside a rolled-back savepoint does not exist afterwards, inside the outer block too."""
    coll = _declare_c(store)
    with store.transaction():
        try:
            with store.transaction():
                store.collection("tmp", key="k", fields={"k": ls.Text()}).put({"k": "z"})
                raise Boom()
        except Boom:
            pass
        coll.put({"k": "a", "n": 1})
        assert "tmp" not in store.collections()
        with pytest.raises(ls.UnknownCollectionError):
            store.collection("tmp")
    assert store.verify().ok


def test_rolled_back_field_is_not_listed(store: ls.Store) -> None:
    """Collection.fields reflects the schema in the file right after a rollback."""
    coll = _declare_c(store)
    with pytest.raises(Boom), store.transaction():
        _declare_c(store, "extra")
        raise Boom()
    assert "extra" not in coll.fields
    assert "extra" not in coll.schema.fields


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestStoreMachine = StoreMachine.TestCase
