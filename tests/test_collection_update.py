"""Partial updates (``Collection.update``/``update_many``) and projections (``fields=``) on real stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localstore as ls
from localstore.update import NotFoundError

FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "k": ls.Text(),
    "n": ls.Integer(nullable=False, default=0),
    "kind": ls.Text(filter=True),
    "note": ls.Text(fulltext=True),
    "tags": ls.Json(),
    "state": ls.Blob(compress=True),
    "vec": ls.Vector(3),
    "arr": ls.Array(),
}


def _items(store: ls.Store, **options: Any) -> ls.Collection:
    return store.collection("items", key="k", fields=FIELDS, **options)


def _row(k: str, n: int = 1, **over: Any) -> dict[str, Any]:
    row = {"k": k, "n": n, "kind": "a", "note": "red fox", "tags": {"t": [1, 2]}, "state": b"s" * 500,
           "vec": np.array([1.0, 0.0, 0.0], dtype=np.float32), "arr": np.arange(6, dtype="<i2").reshape(2, 3)}
    row.update(over)
    return row


def _plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A row with numpy arrays turned into (dtype, shape, list) so rows compare with ==."""
    if row is None:
        return None
    return {k: ((v.dtype.str, v.shape, v.tolist()) if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def _changes(store: ls.Store) -> list[ls.Change]:
    return store.changelog.changes(limit=1_000_000, max_bytes=1 << 40)


# -- round trips ------------------------------------------------------------------------------------


def test_update_changes_only_the_named_fields(store: ls.Store) -> None:
    items = _items(store)
    items.put(_row("a"))
    items.put(_row("b"))
    assert items.update("a", {"n": 5, "tags": ["x"], "state": b"new" * 100}) == "a"
    expected = _row("a", n=5, tags=["x"], state=b"new" * 100)
    assert _plain(items.get("a")) == _plain(expected)
    assert _plain(items.get("b")) == _plain(_row("b"))  # the other row is untouched


def test_update_to_none_on_nullable_field(store: ls.Store) -> None:
    items = _items(store)
    items.put(_row("a"))
    items.update("a", {"note": None, "vec": None, "state": None})
    row = items.get("a")
    assert row is not None and row["note"] is None and row["vec"] is None and row["state"] is None
    assert store.verify().ok


def test_update_many_applies_in_order_and_counts(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row("a"), _row("b"), _row("c")])
    count = items.update_many([("a", {"n": 2}), ("b", {"kind": "b"}), ("a", {"n": 3}), ("a", {"kind": "z"})])
    assert count == 4
    assert items.get("a", fields=["n", "kind"]) == {"k": "a", "n": 3, "kind": "z"}
    assert items.update_many({"b": {"n": 7}, "c": {"n": 8}}) == 2
    assert [r["n"] for r in items.find(fields=["n"])] == [3, 7, 8]
    assert items.update_many([]) == 0
    assert store.verify().ok


def test_update_of_integer_keyed_collection(store: ls.Store) -> None:
    nums = store.collection("nums", key="id", fields={"id": ls.Integer(), "x": ls.Real(), "v": ls.Vector(2)})
    nums.put_many([{"id": i, "x": float(i), "v": [1.0, float(i)]} for i in range(5)])
    nums.update(3, {"v": [0.0, 1.0]})
    hit = nums.nearest("v", [0.0, 1.0], k=1, engine="vec0")[0]
    assert hit.key == 3 and hit.row["x"] == 3.0


# -- the change log ---------------------------------------------------------------------------------


def test_each_update_logs_one_put_of_the_whole_row(store: ls.Store) -> None:
    items = _items(store)
    items.put(_row("a"))
    items.update("a", {"n": 2})
    items.update("a", {"state": b"z" * 300})
    changes = _changes(store)
    assert [(c.op, c.key) for c in changes] == [("put", "a")] * 3
    rows = [_plain(items.decode_payload(c.payload)) for c in changes]  # type: ignore[arg-type]
    assert rows == [_plain(_row("a")), _plain(_row("a", n=2)), _plain(_row("a", n=2, state=b"z" * 300))]
    assert rows[-1] == _plain(items.get("a"))


def test_replaying_the_log_reproduces_the_store(store: ls.Store, tmp_path: Path) -> None:
    """What sync does: apply every change in seq order elsewhere; the copy must equal the source."""
    items = _items(store)
    items.put_many([_row(k, n=i) for i, k in enumerate("abcd")])
    items.update_many({"a": {"n": 10}, "b": {"vec": [0.0, 1.0, 0.0], "kind": "b"}})
    items.delete("c")
    items.update("d", {"note": "blue whale", "arr": np.ones((2, 2))})
    items.update("a", {"tags": None})
    with ls.open(tmp_path / "copy.db") as copy:
        replica = _items(copy)
        for change in _changes(store):
            if change.op == "put":
                replica.put(items.decode_payload(change.payload))  # type: ignore[arg-type]
            else:
                replica.delete(change.key)
        assert [_plain(r) for r in replica.find()] == [_plain(r) for r in items.find()]


def test_verify_agrees_after_updates_and_overwrites(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row(str(i)) for i in range(20)])
    items.update_many({str(i): {"n": i, "kind": "b"} for i in range(0, 20, 2)})
    items.put(_row("4", n=99))  # a full put after an update
    items.update("4", {"note": "again"})
    items.delete("6")
    report = store.verify()
    assert report.ok, report.problems
    assert report.changes == 20 + 10 + 1 + 1 + 1


def test_sync_false_collection_updates_without_records(store: ls.Store) -> None:
    scratch = store.collection("scratch", key="k", fields={"k": ls.Text(), "v": ls.Integer(), "e": ls.Vector(2)},
                               sync=False)
    scratch.put({"k": "a", "v": 1, "e": [1.0, 0.0]})
    scratch.update("a", {"v": 2, "e": [0.0, 1.0]})
    assert scratch.get("a", fields=["v"]) == {"k": "a", "v": 2}
    assert scratch.nearest("e", [0.0, 1.0], k=1)[0].distance == pytest.approx(0.0, abs=1e-6)
    assert _changes(store) == []
    assert store.verify().ok


# -- derived indexes and vector caches --------------------------------------------------------------


def test_vector_filter_and_fulltext_indexes_follow_updates(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row("a"), _row("b", vec=np.array([0.0, 1.0, 0.0], dtype=np.float32))])
    probe = [0.0, 0.0, 1.0]
    for engine in ("cache", "vec0"):  # build the in-memory matrix first, so the update must patch it
        assert {h.key for h in items.nearest("vec", probe, k=2, engine=engine)} == {"a", "b"}
    items.update("a", {"vec": probe})
    items.update("b", {"kind": "b"})
    for engine in ("cache", "vec0"):
        assert items.nearest("vec", probe, k=1, engine=engine)[0].key == "a"
        assert [h.key for h in items.nearest("vec", probe, k=2, where={"kind": "b"}, engine=engine)] == ["b"]
        assert [h.key for h in items.nearest("vec", probe, k=2, where={"kind": "a"}, engine=engine)] == ["a"]
    items.update("b", {"note": "blue whale"})
    assert [h.key for h in items.search(text="whale")] == ["b"]
    assert [h.key for h in items.search(text="fox")] == ["a"]
    items.update("a", {"vec": None, "note": None})
    for engine in ("cache", "vec0"):
        assert [h.key for h in items.nearest("vec", probe, k=2, engine=engine)] == ["b"]
    assert items.search(text="fox") == []
    assert store.verify().ok


def test_mixed_batch_of_filter_and_vector_changes_indexes_the_final_values(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row("a"), _row("b"), _row("c", vec=None)])
    items.nearest("vec", [1.0, 0.0, 0.0], k=1)  # builds the cache, which must follow too
    items.update_many([
        ("a", {"kind": "x"}), ("a", {"vec": [0.0, 1.0, 0.0], "kind": "y"}),  # a filter change, then a re-index
        ("b", {"kind": "p"}), ("b", {"kind": None}),                         # two filter changes, in order
        ("c", {"kind": "q"}),                                                # no vector: no vec0 entry to change
    ])
    probe = [0.0, 1.0, 0.0]
    for engine in ("cache", "vec0"):
        found = {tag: [h.key for h in items.nearest("vec", probe, k=3, where={"kind": tag}, engine=engine)]
                 for tag in ("x", "y", "p", "q", None)}
        assert found == {"x": [], "y": ["a"], "p": [], "q": [], None: ["b"]}, engine
    assert store.verify().ok


def test_fisher_rao_vectors_are_normalised_as_by_put(store: ls.Store) -> None:
    coll = store.collection("p", key="k", fields={"k": ls.Text(), "p": ls.Vector(3, metric="fisher_rao")})
    coll.put({"k": "a", "p": [1.0, 1.0, 2.0]})
    coll.update("a", {"p": [2.0, 2.0, 0.0]})
    assert np.allclose(coll.get("a")["p"], [0.5, 0.5, 0.0])  # type: ignore[index]
    with pytest.raises(ls.ValidationError, match="non-negative"):
        coll.update("a", {"p": [-1.0, 1.0, 1.0]})


# -- encrypted and compressed fields ----------------------------------------------------------------


def test_encrypted_and_compressed_fields(store_path: Path, master_key: str) -> None:
    with ls.open(store_path, key=master_key) as store:
        people = store.collection("people", key="id", fields={
            "id": ls.Text(), "who": ls.Text(), "n": ls.Integer(),
            "secret": ls.Text(encrypt=True, compress=True), "mine": ls.Text(encrypt=True, subject="who"),
            "email": ls.Text(encrypt=True, blind_index=True),
        })
        people.put({"id": "p1", "who": "alice", "n": 1, "secret": "s" * 200, "mine": "diary", "email": "a@x"})
        people.update("p1", {"secret": "t" * 300, "email": "b@x"})
        assert people.get("p1", fields=["secret", "email"]) == {"id": "p1", "secret": "t" * 300, "email": "b@x"}
        assert [r["id"] for r in people.find({"email": "b@x"}, fields=[])] == ["p1"]
        assert people.find({"email": "a@x"}) == []
        # Moving the subject re-encrypts the field that follows it: forgetting the old subject spares it.
        people.update("p1", {"who": "bob"})
        assert store.forget("alice")
        assert people.get("p1", fields=["mine", "who"]) == {"id": "p1", "mine": "diary", "who": "bob"}
        assert store.forget("bob")
        assert people.get("p1", fields=["mine"]) == {"id": "p1", "mine": ls.FORGOTTEN}
        with pytest.raises(ls.ValidationError, match="forgotten"):
            people.update("p1", {"who": "carol"})
        people.update("p1", {"who": "carol", "mine": "fresh"})
        assert people.get("p1", fields=["mine"]) == {"id": "p1", "mine": "fresh"}
        assert store.verify().ok
    with ls.open(store_path, key=master_key) as store:
        assert store.collection("people").get("p1", fields=["secret", "n"]) == {"id": "p1", "secret": "t" * 300, "n": 1}


# -- bad input: a clear error and nothing written ----------------------------------------------------


@pytest.mark.parametrize(("changes", "match"), [
    ({"nope": 1}, "unknown field"),
    ({"n": "five"}, "expected an int"),
    ({"n": None}, "not nullable"),
    ({"vec": [1.0, 2.0]}, "dimension 3"),
    ({"tags": {1, 2}}, "JSON"),
    ({"k": "other"}, "cannot change the key"),
    ({"k": "a"}, "only the key"),
    ({}, "no fields"),
    ("n=5", "dict of field"),
    ({"note": "bad \ud800 text"}, "lone surrogate"),
])
def test_bad_updates_raise_and_write_nothing(store: ls.Store, changes: Any, match: str) -> None:
    items = _items(store)
    items.put(_row("a"))
    before = (_plain(items.get("a")), len(_changes(store)))
    with pytest.raises(ls.ValidationError, match=match):
        items.update("a", changes)
    assert (_plain(items.get("a")), len(_changes(store))) == before


def test_missing_key_raises_not_found_and_writes_nothing(store: ls.Store) -> None:
    items = _items(store)
    items.put(_row("a"))
    with pytest.raises(NotFoundError, match="'ghost'") as caught:
        items.update_many([("a", {"n": 9}), ("ghost", {"n": 1})])
    assert isinstance(caught.value, ls.LocalStoreError) and isinstance(caught.value, KeyError)
    assert "put()" in str(caught.value)
    assert items.get("a", fields=["n"]) == {"k": "a", "n": 1} and len(_changes(store)) == 1
    with pytest.raises(ls.ValidationError):
        items.update(None, {"n": 1})
    with pytest.raises(ls.ValidationError, match="pairs"):
        items.update_many([("a", {"n": 1}, "extra")])  # type: ignore[list-item]


# -- transactions ------------------------------------------------------------------------------------


def test_update_inside_a_transaction_commits_with_it(store: ls.Store) -> None:
    items = _items(store)
    other = store.collection("other", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    items.put(_row("a"))
    with store.transaction():
        items.update("a", {"n": 2})
        other.put({"k": "x", "v": 1})
        items.update("a", {"n": 3})
        assert items.get("a", fields=["n"]) == {"k": "a", "n": 3}  # visible inside the transaction
    assert items.get("a", fields=["n"]) == {"k": "a", "n": 3}
    assert store.verify().ok


def test_rollback_undoes_update_and_its_index_changes(store: ls.Store) -> None:
    items = _items(store)
    items.put(_row("a"))
    assert items.nearest("vec", [1.0, 0.0, 0.0], k=1)[0].key == "a"  # builds the cache
    seq = store.changelog.last_seq()
    with pytest.raises(RuntimeError), store.transaction():
        items.update("a", {"n": 2, "vec": [0.0, 0.0, 1.0], "note": "whale"})
        raise RuntimeError("abort")
    assert _plain(items.get("a")) == _plain(_row("a"))
    assert store.changelog.last_seq() == seq
    hit = items.nearest("vec", [1.0, 0.0, 0.0], k=1)[0]
    assert hit.key == "a" and hit.distance == pytest.approx(0.0, abs=1e-6)
    assert items.search(text="whale") == []
    assert store.verify().ok


def test_failed_update_inside_a_transaction_keeps_earlier_work(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row("a"), _row("b")])
    with store.transaction():
        items.update("a", {"n": 5})
        with pytest.raises(NotFoundError):
            items.update_many({"b": {"n": 6}, "zzz": {"n": 7}})
    assert [r["n"] for r in items.find(fields=["n"])] == [5, 1]
    assert store.verify().ok


# -- projections -------------------------------------------------------------------------------------


def test_projection_returns_key_and_named_fields(store: ls.Store) -> None:
    items = _items(store)
    items.put_many([_row("a", n=1), _row("b", n=2)])
    assert items.find(fields=["n"]) == [{"k": "a", "n": 1}, {"k": "b", "n": 2}]
    assert items.find({"n": {">": 1}}, fields=("tags", "n", "tags"), order_by="-n") == [
        {"k": "b", "tags": {"t": [1, 2]}, "n": 2}]
    assert items.find(fields=[], limit=1) == [{"k": "a"}]
    assert items.get("b", fields=["state"]) == {"k": "b", "state": b"s" * 500}
    assert items.get("zzz", fields=["n"]) is None
    assert items.get_many(["b", "x", "a"], fields=["n"]) == [{"k": "b", "n": 2}, None, {"k": "a", "n": 1}]
    assert _plain(items.find(fields=list(FIELDS))[0]) == _plain(items.find()[0])


@pytest.mark.parametrize("fields", [["nope"], "n", [1], {"n": 1}, [["n"]], 5])
def test_projection_of_unknown_fields_is_refused(store: ls.Store, fields: Any) -> None:
    items = _items(store)
    items.put(_row("a"))
    for read in (lambda: items.find(fields=fields), lambda: items.get("a", fields=fields),
                 lambda: items.get_many(["a"], fields=fields)):
        with pytest.raises(ls.ValidationError, match="fields"):
            read()


def test_projection_does_not_decrypt_fields_left_out(store_path: Path, master_key: str) -> None:
    with ls.open(store_path, key=master_key) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Text(), "n": ls.Integer(), "s": ls.Text(encrypt=True)})
        coll.put({"id": "a", "n": 1, "s": "secret"})
    # Without the master key, the encrypted field cannot be read, but the others still can.
    with ls.open(store_path) as store:
        coll = store.collection("c")
        assert coll.find(fields=["n"]) == [{"id": "a", "n": 1}]
        with pytest.raises(ls.MissingKeyError):
            coll.find(fields=["s"])


def test_projection_sees_a_field_added_by_another_connection(store_path: Path) -> None:
    with ls.open(store_path) as first, ls.open(store_path) as second:
        coll = first.collection("c", key="id", fields={"id": ls.Text(), "a": ls.Integer()})
        coll.put({"id": "x", "a": 1})
        second.collection("c", key="id", fields={"id": ls.Text(), "a": ls.Integer(), "b": ls.Integer()})
        second.collection("c").update("x", {"b": 2})
        assert coll.get("x", fields=["b"]) == {"id": "x", "b": 2}
        coll.update("x", {"b": 3})
        assert second.collection("c").get("x") == {"id": "x", "a": 1, "b": 3}
