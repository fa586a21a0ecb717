"""Collection schemas: kept in the file, reopened by name, evolved safely, and validated strictly."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import apsw
import pytest
from conftest import PYTHON

import localstore as ls

FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "kernel_id": ls.Text(),
    "god_name": ls.Text(index=True),
    "phi": ls.Real(),
    "step": ls.Integer(nullable=False, default=0),
    "basin": ls.Vector(4, metric="l2"),
    "meta": ls.Json(),
}


def _declare(store: ls.Store, **overrides: Any) -> ls.Collection:
    fields = {**FIELDS, **overrides.pop("fields", {})}
    return store.collection("kernels", key=overrides.pop("key", "kernel_id"), fields=fields, **overrides)


def _specs(coll: ls.Collection) -> dict[str, str]:
    return {name: f.describe() for name, f in coll.fields.items()}


def _sqlite_objects(path: Path | str) -> list[tuple[Any, ...]]:
    """Every table, index and trigger in the file, read through a separate raw connection."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return sorted(conn.execute("SELECT type, name, coalesce(sql, '') FROM sqlite_schema").fetchall())
    finally:
        conn.close()


def _snapshot(store: ls.Store) -> dict[str, Any]:
    """What a failed declaration must leave untouched: file schema, collections, rows and the change log."""
    out: dict[str, Any] = {"objects": _sqlite_objects(store.path), "collections": store.collections()}
    with ls.open(store.path) as fresh:
        for name in fresh.collections():
            coll = fresh.collection(name)
            out[f"spec:{name}"] = (coll.key, _specs(coll), coll.schema.sync, coll.schema.ttl)
            out[f"rows:{name}"] = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in coll.find()]
        out["changes"] = [(c.seq, c.key, c.op) for c in fresh.changelog.changes()]
        out["last_seq"] = fresh.changelog.last_seq()
    return out


# -- persistence ---------------------------------------------------------------------------------


def test_schema_persists_and_reopens_by_name(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = _declare(s)
        coll.put({"kernel_id": "k1", "god_name": "zeus", "phi": 0.5, "basin": [1, 2, 3, 4], "meta": {"a": [1]}})
        declared = _specs(coll)
    with ls.open(store_path) as s:
        assert s.collections() == ["kernels"]
        assert "kernels" in s
        coll = s.collection("kernels")
        assert coll.key == "kernel_id"
        assert _specs(coll) == declared
        assert declared["basin"] == "Vector(dim=4, metric='l2')"
        assert declared["step"] == "Integer(nullable=False, default=0)"
        assert declared["god_name"] == "Text(index=True)"
        row = coll.get("k1")
        assert row is not None
        assert row["god_name"] == "zeus" and row["step"] == 0 and row["meta"] == {"a": [1]}
        assert row["basin"].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert s.collection("kernels") is coll


def test_reopen_in_a_new_process(store_path: Path, subprocess_env: dict[str, str]) -> None:
    with ls.open(store_path) as s:
        coll = _declare(s)
        coll.put_many([
            {"kernel_id": "k1", "god_name": "zeus", "phi": 0.25, "step": 3, "basin": [0, 0, 0, 1]},
            {"kernel_id": "k2", "god_name": "hera", "meta": {"x": "ü"}},
        ])
        expected_specs = _specs(coll)
        store_id = s.id
    script = textwrap.dedent(
        """
        import json, sys
        import localstore as ls
        with ls.open(sys.argv[1]) as s:
            coll = s.collection("kernels")
            rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in coll.find()]
            print(json.dumps({
                "id": s.id,
                "collections": s.collections(),
                "key": coll.key,
                "specs": {n: f.describe() for n, f in coll.fields.items()},
                "rows": rows,
                "last_seq": s.changelog.last_seq(),
            }))
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", script, str(store_path)], env=subprocess_env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["id"] == store_id
    assert seen["collections"] == ["kernels"]
    assert seen["key"] == "kernel_id"
    assert seen["specs"] == expected_specs
    assert seen["last_seq"] == 2
    assert seen["rows"] == [
        {"kernel_id": "k1", "god_name": "zeus", "phi": 0.25, "step": 3, "basin": [0.0, 0.0, 0.0, 1.0], "meta": None},
        {"kernel_id": "k2", "god_name": "hera", "phi": None, "step": 0, "basin": None, "meta": {"x": "ü"}},
    ]


def test_unknown_collection_name_only(store: ls.Store) -> None:
    with pytest.raises(ls.UnknownCollectionError, match="nope") as info:
        store.collection("nope")
    assert isinstance(info.value, KeyError)
    assert store.collections() == []


def test_key_without_fields_or_fields_without_key_is_schema_error(store: ls.Store) -> None:
    with pytest.raises(ls.SchemaError):
        store.collection("c", key="k")
    with pytest.raises(ls.SchemaError):
        store.collection("c", fields={"k": ls.Text()})
    assert store.collections() == []


def test_identical_redeclaration_is_a_no_op(store: ls.Store) -> None:
    coll = _declare(store)
    coll.put({"kernel_id": "k1"})
    before = _snapshot(store)
    again = _declare(store)
    assert again is coll
    assert _snapshot(store) == before


def test_redeclaration_with_fewer_fields_keeps_the_others(store: ls.Store) -> None:
    _declare(store)
    coll = store.collection("kernels", key="kernel_id", fields={"kernel_id": ls.Text()})
    assert list(coll.fields) == list(FIELDS)


def test_collections_listed_in_creation_order(store: ls.Store) -> None:
    for name in ("zeta", "alpha", "mid"):
        store.collection(name, key="k", fields={"k": ls.Text()})
    assert store.collections() == ["zeta", "alpha", "mid"]


# -- evolution ------------------------------------------------------------------------------------


def test_adding_fields_old_rows_read_default_or_none(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = _declare(s)
        coll.put({"kernel_id": "old", "phi": 0.1})
    with ls.open(store_path) as s:
        coll = _declare(s, fields={
            "regime": ls.Text(default="linear"),
            "note": ls.Text(),
            "level": ls.Integer(nullable=False, default=5),
            "flag": ls.Boolean(default=False),
        })
        assert list(coll.fields)[-4:] == ["regime", "note", "level", "flag"]
        old = coll.get("old")
        assert old is not None
        assert (old["regime"], old["note"], old["level"], old["flag"], old["phi"]) == ("linear", None, 5, False, 0.1)
        coll.put({"kernel_id": "new", "note": "hi", "level": 1})
        assert [r["note"] for r in coll.find(where={"regime": "linear"}, order_by="kernel_id")] == ["hi", None]
    with ls.open(store_path) as s:
        coll = s.collection("kernels")
        assert "regime" in coll.fields and coll.fields["level"].default == 5
        assert [r["level"] for r in coll.find(order_by="kernel_id")] == [1, 5]
        assert s.verify().ok


def test_field_added_by_another_store_object_is_seen(store_path: Path) -> None:
    with ls.open(store_path) as a, ls.open(store_path) as b:
        ca = _declare(a)
        cb = b.collection("kernels")
        ca.put({"kernel_id": "k1"})
        _declare(a, fields={"extra": ls.Text()})
        # b's cached schema is refreshed at its next write; the new field is accepted.
        cb.put({"kernel_id": "k2", "extra": "from b"})
        assert ca.get("k2") == cb.get("k2")
        row = ca.get("k2")
        assert row is not None and row["extra"] == "from b"


def test_field_added_by_another_store_object_is_seen_by_reads(store_path: Path) -> None:
    with ls.open(store_path) as a, ls.open(store_path) as b:
        _declare(a).put({"kernel_id": "k1"})
        cb = b.collection("kernels")
        _declare(a, fields={"extra": ls.Text()}).put({"kernel_id": "k2", "extra": "new"})
        row = cb.get("k2")
        assert row is not None and row.get("extra") == "new"


def test_adding_a_required_field_without_default_is_refused(store: ls.Store) -> None:
    _declare(store).put({"kernel_id": "k1"})
    before = _snapshot(store)
    with pytest.raises(ls.SchemaError, match=r"kernels\.must"):
        _declare(store, fields={"must": ls.Integer(nullable=False)})
    assert _snapshot(store) == before


def test_index_option_may_change(store: ls.Store) -> None:
    _declare(store).put({"kernel_id": "k1", "phi": 0.5})
    coll = _declare(store, fields={"phi": ls.Real(index=True), "god_name": ls.Text()})
    assert coll.fields["phi"].index and not coll.fields["god_name"].index
    index_names = {name for kind, name, _ in _sqlite_objects(store.path) if kind == "index"}
    assert any(n.endswith(".phi") for n in index_names)
    assert not any(n.endswith(".god_name") for n in index_names)
    assert coll.find(where={"phi": {">": 0.1}})[0]["kernel_id"] == "k1"


def test_ttl_may_change_and_is_kept(store_path: Path) -> None:
    with ls.open(store_path) as s:
        _declare(s, ttl=60)
        assert _declare(s).schema.ttl == 60  # redeclaring without ttl keeps it
        assert _declare(s, ttl=120).schema.ttl == 120
    with ls.open(store_path) as s:
        assert s.collection("kernels").schema.ttl == 120


@pytest.mark.parametrize(
    "change",
    [
        {"fields": {"phi": ls.Integer()}},
        {"fields": {"phi": ls.Text()}},
        {"fields": {"basin": ls.Vector(8, metric="l2")}},
        {"fields": {"basin": ls.Vector(4, metric="cosine")}},
        {"key": "god_name"},
        {"fields": {"phi": ls.Real(nullable=False, default=0.0)}},
        {"fields": {"step": ls.Integer(default=0)}},
        {"sync": False},
        {"fields": {"aaa_new": ls.Text(), "phi": ls.Integer()}},
    ],
    ids=["real->integer", "real->text", "vector-dim", "vector-metric", "key", "nullable->not", "not-null->nullable",
         "sync", "new-field-plus-type-change"],
)
def test_incompatible_redeclaration_changes_nothing(store: ls.Store, change: dict[str, Any]) -> None:
    coll = _declare(store)
    coll.put({"kernel_id": "k1", "god_name": "zeus", "phi": 0.5})
    coll.put({"kernel_id": "k2", "god_name": "hera"})
    before = _snapshot(store)
    with pytest.raises(ls.SchemaError, match="kernels"):
        _declare(store, **change)
    assert _snapshot(store) == before
    # The cached collection still works with its old schema.
    assert store.collection("kernels") is coll
    assert list(coll.fields) == list(FIELDS)
    coll.put({"kernel_id": "k3", "phi": 1.0})
    assert coll.get("k3") is not None


def test_field_respelled_in_another_case_is_refused(store: ls.Store) -> None:
    _declare(store).put({"kernel_id": "k1", "phi": 0.5})
    before = _snapshot(store)
    respelled = {("PHI" if n == "phi" else n): f for n, f in FIELDS.items()}
    with pytest.raises(ls.SchemaError, match="phi"):
        store.collection("kernels", key="kernel_id", fields=respelled)
    assert _snapshot(store) == before


def test_sync_false_cannot_become_true(store: ls.Store) -> None:
    store.collection("scratch", key="k", fields={"k": ls.Text()}, sync=False)
    with pytest.raises(ls.SchemaError, match="sync"):
        store.collection("scratch", key="k", fields={"k": ls.Text()})
    assert store.collection("scratch").schema.sync is False


@pytest.mark.parametrize("ttl", [0, -5, "60", True], ids=repr)
def test_bad_ttl_is_schema_error(store: ls.Store, ttl: Any) -> None:
    with pytest.raises(ls.SchemaError):
        store.collection("c", key="k", fields={"k": ls.Text()}, ttl=ttl)
    assert store.collections() == []


# -- options not yet supported ----------------------------------------------------------------------


# -- names -------------------------------------------------------------------------------------------

BAD_NAMES: list[Any] = [
    'x"; DROP TABLE kernels; --',
    "kernels; DROP TABLE kernels",
    "x' OR '1'='1",
    "_ls",
    "_ls_meta",
    "_LS_changes",
    "sqlite_master",
    "SQLite_x",
    "rowid",
    "OID",
    "_rowid_",
    "",
    "a" * 64,
    "1abc",
    "a-b",
    "a b",
    "a.b",
    "é",
    "tab\t",
    "x\x00y",
    5,
    None,
    b"bytes",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_collection_names_are_refused(store: ls.Store, name: Any) -> None:
    _declare(store).put({"kernel_id": "k1"})
    before = _snapshot(store)
    with pytest.raises(ls.InvalidNameError) as info:
        store.collection(name, key="k", fields={"k": ls.Text()})
    assert isinstance(info.value, ValueError) and isinstance(info.value, ls.SchemaError)
    assert _snapshot(store) == before


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_field_names_are_refused(store: ls.Store, name: Any) -> None:
    _declare(store).put({"kernel_id": "k1"})
    before = _snapshot(store)
    with pytest.raises(ls.InvalidNameError):
        store.collection("fresh", key="k", fields={"k": ls.Text(), name: ls.Text()})
    with pytest.raises(ls.InvalidNameError):
        _declare(store, fields={name: ls.Text()})
    assert _snapshot(store) == before


def test_longest_valid_names_work(store: ls.Store) -> None:
    name, field = "c" * 63, "f" * 63
    coll = store.collection(name, key=field, fields={field: ls.Text()})
    coll.put({field: "v"})
    assert store.collection(name).get("v") == {field: "v"}


def test_sql_keywords_are_valid_names(store: ls.Store) -> None:
    coll = store.collection("select", key="from", fields={"from": ls.Text(), "where": ls.Integer(), "order": ls.Text()})
    coll.put({"from": "a", "where": 1, "order": "x"})
    assert coll.find(where={"where": 1}, order_by="-order") == [{"from": "a", "where": 1, "order": "x"}]


def test_case_colliding_field_names_are_refused(store: ls.Store) -> None:
    with pytest.raises(ls.SchemaError, match="collide"):
        store.collection("c", key="k", fields={"k": ls.Text(), "Name": ls.Text(), "name": ls.Text()})
    with pytest.raises(ls.SchemaError):
        store.collection("c", key="k", fields={"k": ls.Text(), "K": ls.Integer()})
    assert store.collections() == []


def test_collection_names_are_case_insensitive(store: ls.Store) -> None:
    coll = store.collection("items", key="k", fields={"k": ls.Text()})
    coll.put({"k": "a"})
    same = store.collection("ITEMS", key="k", fields={"k": ls.Text()})
    assert same.name == "items"
    assert store.collections() == ["items"]
    assert same.get("a") == {"k": "a"}


def test_key_must_name_a_declared_field(store: ls.Store) -> None:
    with pytest.raises(ls.SchemaError, match="zz"):
        store.collection("c", key="zz", fields={"k": ls.Text()})
    with pytest.raises(ls.SchemaError):
        store.collection("c", key=None, fields={"k": ls.Text()})
    assert store.collections() == []


@pytest.mark.parametrize(
    "field",
    [ls.Real(), ls.Boolean(), ls.Json(), ls.Blob(), ls.Array(), ls.Vector(3)],
    ids=lambda f: f.type_name,
)
def test_key_of_wrong_type_is_refused(store: ls.Store, field: ls.Field) -> None:
    with pytest.raises(ls.SchemaError, match=field.type_name):
        store.collection("c", key="k", fields={"k": field, "v": ls.Text()})
    assert store.collections() == []
    assert [o for o in _sqlite_objects(store.path) if o[1] == "c"] == []


@pytest.mark.parametrize("fields", [{}, [], None, {"k": "Text"}, {"k": int}, {"k": ls.Text(), "v": 3}], ids=repr)
def test_malformed_field_declarations(store: ls.Store, fields: Any) -> None:
    with pytest.raises(ls.SchemaError):
        store.collection("c", key="k", fields=fields)
    assert store.collections() == []


def test_index_names_of_different_collections_never_collide(store: ls.Store) -> None:
    store.collection("a", key="k", fields={"k": ls.Text(), "_b": ls.Text(index=True)})
    coll = store.collection("a_", key="k", fields={"k": ls.Text(), "b": ls.Text(index=True)})
    coll.put({"k": "1", "b": "x"})
    assert coll.find(where={"b": "x"}) == [{"k": "1", "b": "x"}]


def test_unhashable_collection_name_is_schema_error(store: ls.Store) -> None:
    with pytest.raises(ls.SchemaError):
        store.collection(["kernels"])  # type: ignore[arg-type]
