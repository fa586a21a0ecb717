"""Collections: writes, reads, queries and transactions against a real store file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

import localstore as ls


@pytest.fixture
def people(store: ls.Store) -> ls.Collection:
    """A collection with a Text key and a few comparable fields, holding five rows."""
    coll = store.collection("people", key="name", fields={
        "name": ls.Text(),
        "age": ls.Integer(index=True),
        "score": ls.Real(),
        "team": ls.Text(),
        "active": ls.Boolean(),
        "meta": ls.Json(),
    })
    coll.put_many([
        {"name": "ann", "age": 31, "score": 0.9, "team": "red", "active": True, "meta": {"n": 1}},
        {"name": "bob", "age": 25, "score": 0.4, "team": "blue", "active": False},
        {"name": "cyd", "age": 40, "score": 0.7, "team": "red", "active": True},
        {"name": "dee", "age": 25, "score": 0.95, "team": None, "active": False},
        {"name": "eve", "age": 58, "score": None, "team": "green", "active": True},
    ])
    return coll


def _names(rows: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in rows]


def _change_count(store: ls.Store) -> int:
    return len(store.changelog.changes(limit=1_000_000))


# -- writes ----------------------------------------------------------------------------------


def test_put_returns_key_and_get_reads_row(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    assert coll.put({"k": "a", "v": 1}) == "a"
    assert coll.get("a") == {"k": "a", "v": 1}
    assert coll.get("missing") is None


def test_put_upsert_replaces_the_whole_row(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={
        "k": ls.Text(), "a": ls.Integer(), "b": ls.Text(), "c": ls.Text(default="dflt"),
    })
    coll.put({"k": "x", "a": 1, "b": "one", "c": "given"})
    coll.put({"k": "x", "a": 2})
    # Fields left out are reset to their default (or None), not merged from the old row.
    assert coll.get("x") == {"k": "x", "a": 2, "b": None, "c": "dflt"}
    assert coll.count() == 1


def test_put_many_returns_count_and_accepts_generators(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    assert coll.put_many([]) == 0
    assert coll.put_many({"k": f"k{i}", "v": i} for i in range(10)) == 10
    assert coll.count() == 10
    assert coll.get("k7") == {"k": "k7", "v": 7}


def test_put_many_same_key_twice_keeps_last(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    assert coll.put_many([{"k": "a", "v": 1}, {"k": "a", "v": 2}]) == 2
    assert coll.get("a") == {"k": "a", "v": 2}
    assert coll.count() == 1


def test_put_accepts_dict_subclasses(store: ls.Store) -> None:
    from collections import OrderedDict

    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    coll.put(OrderedDict(k="a", v=1))
    assert coll.get("a") == {"k": "a", "v": 1}


def test_get_many_keeps_order_and_gives_none_for_missing(people: ls.Collection) -> None:
    rows = people.get_many(["eve", "nobody", "ann", "eve", "bob"])
    assert [None if r is None else r["name"] for r in rows] == ["eve", None, "ann", "eve", "bob"]
    assert rows[2] == people.get("ann")
    assert people.get_many([]) == []


def test_delete_returns_whether_row_existed(people: ls.Collection) -> None:
    assert people.delete("ann") is True
    assert people.delete("ann") is False
    assert people.delete("nobody") is False
    assert people.get("ann") is None
    assert people.count() == 4


def test_delete_many_returns_number_deleted(people: ls.Collection) -> None:
    assert people.delete_many(["ann", "nobody", "bob", "ann"]) == 2
    assert people.delete_many([]) == 0
    assert people.delete_many(["nobody"]) == 0
    assert sorted(people.keys()) == ["cyd", "dee", "eve"]


def test_count_and_len(people: ls.Collection) -> None:
    assert people.count() == 5
    assert len(people) == 5
    assert people.count(where={"team": "red"}) == 2
    assert people.count(where={"age": {">": 100}}) == 0
    assert "ann" in people
    assert "zed" not in people


# -- find ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"team": "red"}, ["ann", "cyd"]),
        ({"age": {"=": 25}}, ["bob", "dee"]),
        ({"age": {"==": 25}}, ["bob", "dee"]),
        ({"age": {"!=": 25}}, ["ann", "cyd", "eve"]),
        ({"age": {"<": 31}}, ["bob", "dee"]),
        ({"age": {"<=": 31}}, ["ann", "bob", "dee"]),
        ({"age": {">": 31}}, ["cyd", "eve"]),
        ({"age": {">=": 31}}, ["ann", "cyd", "eve"]),
        ({"age": {">": 25, "<": 58}}, ["ann", "cyd"]),
        ({"team": {"in": ["blue", "green"]}}, ["bob", "eve"]),
        ({"team": {"in": []}}, []),
        ({"age": {"in": (25, 40)}}, ["bob", "cyd", "dee"]),
        ({"team": {"not in": ["red", "blue"]}}, ["eve"]),
        ({"team": None}, ["dee"]),
        ({"team": {"=": None}}, ["dee"]),
        ({"team": {"!=": None}}, ["ann", "bob", "cyd", "eve"]),
        ({"score": None}, ["eve"]),
        ({"score": {">": 0.5}}, ["ann", "cyd", "dee"]),
        ({"score": {">": 0}}, ["ann", "bob", "cyd", "dee"]),
        ({"active": True, "team": "red"}, ["ann", "cyd"]),
        ({"active": False}, ["bob", "dee"]),
        ({"name": "cyd"}, ["cyd"]),
        ({}, ["ann", "bob", "cyd", "dee", "eve"]),
        (None, ["ann", "bob", "cyd", "dee", "eve"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) or v is None else None,
)
def test_find_operators(people: ls.Collection, where: dict[str, Any] | None, expected: list[str]) -> None:
    assert sorted(_names(people.find(where=where))) == expected
    assert people.count(where=where) == len(expected)
    assert sorted(people.keys(where=where)) == expected


def test_find_returns_full_decoded_rows(people: ls.Collection) -> None:
    assert people.find(where={"name": "ann"}) == [
        {"name": "ann", "age": 31, "score": 0.9, "team": "red", "active": True, "meta": {"n": 1}}
    ]


@pytest.mark.parametrize(
    "where",
    [
        {"nope": 1},
        {"meta": {"n": 1}},
        {"age": {"~": 1}},
        {"age": {}},
        {"age": {"<": None}},
        {"age": {"in": 25}},
        {"team": {"in": "red"}},
        {"age": "old"},
        {"age": {">": "10"}},
        ["age", 1],
    ],
    ids=["unknown-field", "json-field", "unknown-op", "empty-op-dict", "none-with-lt", "in-scalar", "in-str",
         "wrong-type", "wrong-type-op", "not-a-dict"],
)
def test_find_bad_where_is_query_error(people: ls.Collection, where: Any) -> None:
    with pytest.raises(ls.QueryError):
        people.find(where=where)


def test_where_values_are_bound_not_spliced(people: ls.Collection) -> None:
    assert people.find(where={"team": "red' OR '1'='1"}) == []
    assert people.find(where={"team": {"in": ['x") OR 1=1 --']}}) == []
    assert people.count() == 5


def test_order_by_ascending_descending_and_multiple(people: ls.Collection) -> None:
    assert _names(people.find(order_by="age")) == ["bob", "dee", "ann", "cyd", "eve"]  # ties: insertion order
    assert _names(people.find(order_by="-age"))[:3] == ["eve", "cyd", "ann"]
    assert _names(people.find(order_by=["age", "-score"])) == ["dee", "bob", "ann", "cyd", "eve"]
    assert _names(people.find(order_by=["-age", "name"])) == ["eve", "cyd", "ann", "bob", "dee"]
    by_tuple = people.find(order_by=("age", "name"))  # type: ignore[arg-type]
    assert _names(by_tuple) == ["bob", "dee", "ann", "cyd", "eve"]
    assert _names(people.find(where={"team": "red"}, order_by="-score")) == ["ann", "cyd"]
    # NULLs sort first ascending, last descending (SQLite's rule).
    assert _names(people.find(order_by="score"))[0] == "eve"
    assert _names(people.find(order_by="-score"))[-1] == "eve"


def test_ties_fall_back_to_insertion_order(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "g": ls.Integer()})
    for k in ("z", "b", "m", "a"):
        coll.put({"k": k, "g": 1})
    assert [r["k"] for r in coll.find(order_by="g")] == ["z", "b", "m", "a"]
    assert coll.keys() == ["z", "b", "m", "a"]


@pytest.mark.parametrize("order_by", ["nope", "-nope", "meta", [], [1], 5], ids=repr)
def test_bad_order_by_is_query_error(people: ls.Collection, order_by: Any) -> None:
    with pytest.raises(ls.QueryError):
        people.find(order_by=order_by)


def test_limit_and_offset(people: ls.Collection) -> None:
    ordered = ["dee", "bob", "ann", "cyd", "eve"]
    assert _names(people.find(order_by=["age", "-score"], limit=2)) == ordered[:2]
    assert _names(people.find(order_by=["age", "-score"], limit=2, offset=2)) == ordered[2:4]
    assert _names(people.find(order_by=["age", "-score"], offset=3)) == ordered[3:]
    assert _names(people.find(order_by=["age", "-score"], offset=10)) == []
    assert people.find(limit=0) == []
    assert len(people.keys(limit=3)) == 3


@pytest.mark.parametrize(("limit", "offset"), [(-1, None), (None, -1), (1.5, None), (True, None), ("2", None)])
def test_bad_limit_or_offset_is_query_error(people: ls.Collection, limit: Any, offset: Any) -> None:
    with pytest.raises(ls.QueryError):
        people.find(limit=limit, offset=offset)


def test_iteration_yields_all_rows(people: ls.Collection) -> None:
    assert sorted(_names(list(people))) == ["ann", "bob", "cyd", "dee", "eve"]


# -- Integer keys -------------------------------------------------------------------------------------


def test_integer_keys(store: ls.Store) -> None:
    coll = store.collection("nums", key="id", fields={"id": ls.Integer(), "v": ls.Text()})
    big, small = 2**63 - 1, -(2**63)
    coll.put_many([{"id": 3, "v": "three"}, {"id": big, "v": "big"}, {"id": small, "v": "small"}, {"id": 0}])
    assert coll.get(3) == {"id": 3, "v": "three"}
    assert coll.get(big) == {"id": big, "v": "big"}
    assert [None if r is None else r["v"] for r in coll.get_many([small, 99, big, 0])] == ["small", None, "big", None]
    assert sorted(coll.keys()) == [small, 0, 3, big]
    assert [r["id"] for r in coll.find(where={"id": {">": 0}}, order_by="-id")] == [big, 3]
    assert [r["id"] for r in coll.find(where={"id": {"in": [big, small]}}, order_by="id")] == [small, big]
    assert coll.delete(big) is True
    assert coll.delete(big) is False
    assert coll.count() == 3
    with pytest.raises(ls.ValidationError, match="nums"):
        coll.get("3")
    with pytest.raises(ls.ValidationError, match="nums"):
        coll.get(None)


def test_integer_keys_come_back_in_key_order(store: ls.Store) -> None:
    """Storage order is the rowid: insertion order for Text keys, key order for Integer keys (documented)."""
    coll = store.collection("nums", key="id", fields={"id": ls.Integer()})
    for k in (30, 10, 20):
        coll.put({"id": k})
    assert coll.keys() == [10, 20, 30]
    assert [r["id"] for r in coll.find()] == [10, 20, 30]


# -- transactions -------------------------------------------------------------------------------------


def test_transaction_spans_collections_atomically(store: ls.Store) -> None:
    a = store.collection("a", key="k", fields={"k": ls.Text()})
    b = store.collection("b", key="k", fields={"k": ls.Text()})
    with store.transaction():
        a.put({"k": "1"})
        b.put({"k": "2"})
        assert store.in_transaction
    assert not store.in_transaction
    assert a.keys() == ["1"] and b.keys() == ["2"]
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        a.put({"k": "3"})
        b.delete("2")
        raise RuntimeError("boom")
    assert a.keys() == ["1"] and b.keys() == ["2"]
    with pytest.raises(TypeError):  # the public block takes no options (the reader's short wait is internal)
        store.transaction(_wait=False)  # type: ignore[call-arg]


def test_rollback_leaves_no_rows_and_no_change_records(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    coll.put({"k": "kept", "v": 1})
    log = store.changelog
    before = (log.last_seq(), _change_count(store))
    with pytest.raises(ValueError, match="abort"), store.transaction():
        coll.put_many([{"k": f"n{i}", "v": i} for i in range(5)])
        coll.put({"k": "kept", "v": 2})
        coll.delete("kept")
        raise ValueError("abort")
    assert coll.keys() == ["kept"]
    assert coll.get("kept") == {"k": "kept", "v": 1}
    assert (log.last_seq(), _change_count(store)) == before
    # The next write continues the sequence with no gap.
    coll.put({"k": "next"})
    assert [c.seq for c in log.changes()] == [1, 2]
    assert store.verify().ok


def test_keyboard_interrupt_rolls_back(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text()})
    with pytest.raises(KeyboardInterrupt), store.transaction():
        coll.put({"k": "a"})
        raise KeyboardInterrupt
    assert coll.count() == 0
    assert store.changelog.last_seq() == 0


def test_nested_savepoint_inner_raises_outer_commits(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    other = store.collection("o", key="k", fields={"k": ls.Text()})
    with store.transaction():
        coll.put({"k": "outer1", "v": 1})
        with contextlib.suppress(LookupError), store.transaction():
            coll.put({"k": "inner", "v": 2})
            coll.put({"k": "outer1", "v": 99})
            other.put({"k": "inner"})
            raise LookupError
        with store.transaction():
            coll.put({"k": "inner2", "v": 3})
        coll.put({"k": "outer2", "v": 4})
    assert sorted(coll.keys()) == ["inner2", "outer1", "outer2"]
    assert coll.get("outer1") == {"k": "outer1", "v": 1}
    assert other.count() == 0
    changes = store.changelog.changes()
    assert [(c.seq, c.key) for c in changes] == [(1, "outer1"), (2, "inner2"), (3, "outer2")]
    assert changes[0].payload == {"k": "outer1", "v": 1}
    assert store.verify().ok


def test_an_all_or_nothing_block_rolls_back_whole_at_any_depth(store: ls.Store) -> None:
    """The kits' blocks open no savepoint per nested write; an error still undoes the whole block, nothing else."""
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    vec = store.collection("e", key="k", fields={"k": ls.Text(), "x": ls.Vector(4)})

    def kit_operation(fail: bool) -> None:  # as a kit writes: several collections, nested blocks, no catching
        with store._all_or_nothing():
            coll.put({"k": "kit1", "v": 1})
            with store.transaction():
                vec.put({"k": "kit2", "x": [1.0, 0.0, 0.0, 0.0]})
                coll.update("kit1", {"v": 2})
            if fail:
                coll.put({"k": "kit3", "v": "bad"})

    with store.transaction():
        coll.put({"k": "user", "v": 0})
        with pytest.raises(ls.ValidationError):
            kit_operation(fail=True)  # inside a user's transaction: the kit's block is one savepoint
        coll.put({"k": "after", "v": 3})
    assert sorted(coll.keys()) == ["after", "user"] and vec.count() == 0
    with pytest.raises(ls.ValidationError):
        kit_operation(fail=True)  # at the top: the whole transaction
    assert sorted(coll.keys()) == ["after", "user"] and vec.count() == 0
    assert [(c.seq, c.key) for c in store.changelog.changes()] == [(1, "user"), (2, "after")]
    kit_operation(fail=False)
    assert coll.get("kit1") == {"k": "kit1", "v": 2} and [h.key for h in vec.nearest("x", [1, 0, 0, 0], k=1)] == ["kit2"]
    assert [c.seq for c in store.changelog.changes()] == [1, 2, 3, 4, 5]  # no gap left by the failed blocks
    assert store.verify().ok


def test_an_error_swallowed_inside_an_all_or_nothing_block_rolls_it_back_loudly(store: ls.Store) -> None:
    """A nested write that failed there left no savepoint to undo its part: the block must not commit."""
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    with pytest.raises(ls.LocalStoreError, match="caught and ignored"), store._all_or_nothing():
        coll.put({"k": "a", "v": 1})
        with contextlib.suppress(ls.ValidationError):
            coll.put_many([{"k": "b", "v": 2}, {"k": "c", "v": "bad"}])
    assert coll.count() == 0 and store.changelog.last_seq() == 0
    with store._all_or_nothing():  # the next block starts clean
        coll.put({"k": "d", "v": 4})
    assert coll.keys() == ["d"] and store.verify().ok


def test_error_inside_put_many_in_transaction_rolls_back_only_when_it_escapes(store: ls.Store) -> None:
    coll = store.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    with store.transaction():
        coll.put({"k": "a", "v": 1})
        with pytest.raises(ls.ValidationError):
            coll.put_many([{"k": "b", "v": 2}, {"k": "c", "v": "bad"}])
        coll.put({"k": "d", "v": 4})
    assert sorted(coll.keys()) == ["a", "d"]
    assert [c.key for c in store.changelog.changes()] == ["a", "d"]


def test_committed_data_is_on_disk(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = s.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
        with s.transaction():
            coll.put({"k": "a", "v": 1})
        with pytest.raises(RuntimeError), s.transaction():
            coll.put({"k": "b", "v": 2})
            raise RuntimeError
    with ls.open(store_path) as s:
        assert s.collection("c").find() == [{"k": "a", "v": 1}]


def test_collection_declared_in_rolled_back_transaction_is_gone(store: ls.Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.collection("ghost", key="k", fields={"k": ls.Text()})
        raise RuntimeError
    assert "ghost" not in store.collections()
    with pytest.raises(ls.UnknownCollectionError):
        store.collection("ghost")
