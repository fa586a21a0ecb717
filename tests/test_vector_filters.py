"""Filtered KNN: exactly min(k, matching) hits, equal to brute force over the matching rows, for every operator and engine."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localstore as ls

ENGINES = ("cache", "vec0")
DIM = 16
N = 800
FAR = range(790, 800)  # rows whose vectors sit far from the origin query, with rare filter values


@pytest.fixture(autouse=True, params=["catch-up", "scan"])
def vec0_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every vec0 query both ways: after catching the index up, and scanning fresh rows beside it."""
    import localstore.nearest

    monkeypatch.setattr(localstore.nearest, "DEFAULT_PENDING_SCAN", 0 if request.param == "catch-up" else 10**9)
    return str(request.param)

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def sql_matches(row: dict[str, Any], where: dict[str, Any] | None) -> bool:
    """Evaluate ``where`` on a row as SQL would: NULL fails every test except ``= None`` / ``!= None``."""
    for name, condition in (where or {}).items():
        value = row[name]
        tests = condition if isinstance(condition, dict) else {"=": condition}
        for op, wanted in tests.items():
            op = op.lower()
            if wanted is None:
                ok = (value is None) if op in ("=", "==") else (value is not None)
            elif value is None:
                ok = False
            elif op == "in":
                ok = value in list(wanted)
            elif op == "not in":
                ok = value not in list(wanted)
            else:
                ok = _COMPARE[op](value, wanted)
            if not ok:
                return False
    return True


def distances(rows: list[dict[str, Any]], query: np.ndarray) -> dict[Any, float]:
    """Exact float64 L2 distances from ``query`` to each row's stored vector."""
    if not rows:
        return {}
    matrix = np.stack([r["v"] for r in rows]).astype(np.float64)
    d = np.sqrt(((matrix - np.asarray(query, dtype=np.float64)) ** 2).sum(axis=1))
    return {r["id"]: float(x) for r, x in zip(rows, d)}


def assert_filtered(hits: list[Any], truth: dict[Any, float], k: int, where: Any, atol: float, label: str) -> None:
    """Exactly min(k, matching) hits, all matching, the nearest of the matching rows (near-ties tolerated)."""
    want = min(k, len(truth))
    assert len(hits) == want, f"{label}: {len(hits)} hits for {len(truth)} matching rows, k={k}"
    keys = [h.key for h in hits]
    assert len(set(keys)) == len(keys)
    for h in hits:
        assert h.key in truth, f"{label}: {h.key} does not match {where}"
        assert sql_matches(h.row, where), f"{label}: returned row {h.row} fails {where}"
        assert h.distance == pytest.approx(truth[h.key], abs=atol, rel=1e-5)
    if want:
        kth = sorted(truth.values())[want - 1]
        must = {key for key, d in truth.items() if d < kth - atol - 1e-5 * kth}
        assert must <= set(keys), f"{label}: missing {sorted(must - set(keys))[:5]}"


def tol(engine: str) -> float:
    return 1e-6 if engine == "cache" else 1e-4


def declare(store: ls.Store) -> ls.Collection:
    return store.collection("items", key="id", fields={
        "id": ls.Integer(),
        "name": ls.Text(filter=True),
        "n": ls.Integer(filter=True),
        "x": ls.Real(filter=True),
        "flag": ls.Boolean(filter=True),
        "v": ls.Vector(DIM, metric="l2"),
    })


def make_rows(seed: int = 0) -> list[dict[str, Any]]:
    """Rows with common and rare filter values, about 5% None in each filter, and a far cluster of rare values."""
    rng = np.random.default_rng(seed)
    names = ["alpha", "beta", "gamma", "delta"]
    rows = []
    for i in range(N):
        far = i in FAR
        rows.append({
            "id": i,
            "name": "zeta" if far else (None if rng.random() < 0.05 else names[int(rng.integers(0, 4))]),
            "n": 1000 + i if far else (None if rng.random() < 0.05 else int(rng.integers(0, 100))),
            "x": 500.0 + i if far else (None if rng.random() < 0.05 else float(rng.random())),
            "flag": True if far else (None if rng.random() < 0.05 else bool(rng.random() < 0.5)),
            "v": (rng.normal(size=DIM) + (100.0 if far else 0.0)).astype(np.float32),
        })
    # Rows with None everywhere, and near the origin.
    for i in (3, 4):
        rows[i].update(name=None, n=None, x=None, flag=None)
    return rows


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ls.Store, ls.Collection, list[dict[str, Any]]]]:
    """One store shared by the read-only filter tests (the in-memory cache stays warm across them)."""
    path = tmp_path_factory.mktemp("filters") / "filters.db"
    store = ls.open(path)
    coll = declare(store)
    coll.put_many(make_rows())
    rows = coll.find()  # as stored: float32 vectors, None where no value
    try:
        yield store, coll, rows
    finally:
        store.close()



WHERE_CASES: list[Any] = [
    # Text
    {"name": "alpha"},
    {"name": {"==": "beta"}},
    {"name": "zeta"},
    {"name": {"!=": "alpha"}},
    {"name": {"<": "beta"}},
    {"name": {"<=": "beta"}},
    {"name": {">": "delta"}},
    {"name": {">=": "gamma"}},
    {"name": {"in": ["zeta", "beta"]}},
    {"name": {"in": ["zeta"]}},
    {"name": {"in": []}},
    {"name": {"not in": ["alpha", "beta", "gamma", "delta"]}},
    {"name": {"not in": ["alpha"]}},
    {"name": {"not in": []}},
    {"name": None},
    {"name": {"!=": None}},
    {"name": "no such name"},
    # Integer
    {"n": 5},
    {"n": {"!=": 5}},
    {"n": {"<": 10}},
    {"n": {"<=": 10}},
    {"n": {">": 999}},
    {"n": {">=": 1000}},
    {"n": {">": 10, "<": 20}},
    {"n": {"in": [1000 + 790, 1000 + 795, 7]}},
    {"n": {"not in": list(range(100))}},
    {"n": None},
    {"n": {"!=": None}},
    # Real
    {"x": {"<": 0.1}},
    {"x": {"<=": 0.5}},
    {"x": {">": 0.5}},
    {"x": {">=": 500.0}},
    {"x": {">": 499}},
    {"x": {"in": [1290.0, 1295.0]}},
    {"x": {"not in": [1290.0]}},
    {"x": None},
    {"x": {"!=": None}},
    # Boolean
    {"flag": True},
    {"flag": False},
    {"flag": {"!=": True}},
    {"flag": {"in": [True]}},
    {"flag": {"not in": [False]}},
    {"flag": None},
    {"flag": {"!=": None}},
    # Combinations
    {"name": "zeta", "flag": True},
    {"name": {"in": ["alpha", "beta"]}, "n": {"<": 50}, "x": {"!=": None}},
    {"name": None, "n": None, "x": None, "flag": None},
    {"n": {">=": 1000}, "x": {"<": 1293.0}},
    {"flag": False, "name": "zeta"},
    # Operators in another case
    {"n": {"IN": [1790, 1791]}},
    {"name": {"NOT IN": ["alpha", "beta", "gamma", "delta"]}},
]

def _vec0_marks(where: dict[str, Any]) -> list[Any]:
    """Marks for vec0 cases (none: every operator is exact on vec0 too)."""
    return []


PARAMS = [
    pytest.param(where, engine, id=f"{engine}-{where!r:.60}", marks=_vec0_marks(where) if engine == "vec0" else [])
    for where in WHERE_CASES
    for engine in ENGINES
]


def test_oracle_agrees_with_find(filtered: tuple[ls.Store, ls.Collection, list[dict[str, Any]]]) -> None:
    """The Python evaluation of where used as the oracle agrees with find() on every case."""
    _, coll, rows = filtered
    for where in WHERE_CASES:
        if where == {"name": {"not in": []}}:
            continue  # find() follows SQLite here (NULL NOT IN () is true); nearest() keeps None out of "not in"
        assert {r["id"] for r in coll.find(where)} == {r["id"] for r in rows if sql_matches(r, where)}, where
    # The data has what the cases need: Nones in every filter, far rare rows, common values.
    for name in ("name", "n", "x", "flag"):
        assert 20 < sum(r[name] is None for r in rows) < 100
    assert coll.count({"name": "zeta"}) == len(FAR)


@pytest.mark.parametrize("where, engine", PARAMS)
def test_filtered_knn_exact(
    filtered: tuple[ls.Store, ls.Collection, list[dict[str, Any]]], where: dict[str, Any], engine: str
) -> None:
    _, coll, rows = filtered
    matching = [r for r in rows if sql_matches(r, where)]
    origin = np.zeros(DIM, dtype=np.float32)
    near_far = np.full(DIM, 100.0, dtype=np.float32)
    for q in (origin, near_far):
        truth = distances(matching, q)
        for k in (1, 3, 10, 60, 4096):
            hits = coll.nearest("v", q, k=k, where=where, engine=engine)
            assert_filtered(hits, truth, k, where, tol(engine), f"{engine} k={k} {where}")
    batch = coll.nearest("v", np.stack([origin, near_far]), k=10, where=where, engine=engine)
    for q, hits in zip((origin, near_far), batch):
        assert_filtered(hits, distances(matching, q), 10, where, tol(engine), f"batch {engine} {where}")


@pytest.mark.parametrize("engine", ENGINES)
def test_filter_on_exact_stored_real_value(
    filtered: tuple[ls.Store, ls.Collection, list[dict[str, Any]]], engine: str
) -> None:
    _, coll, rows = filtered
    value = next(r["x"] for r in rows if r["x"] is not None and r["x"] < 1)
    for where in ({"x": value}, {"x": {"!=": value}}, {"x": {"<=": value}}, {"x": {">=": value}}):
        truth = distances([r for r in rows if sql_matches(r, where)], np.zeros(DIM))
        for k in (1, 10, 4096):
            assert_filtered(coll.nearest("v", np.zeros(DIM), k=k, where=where, engine=engine), truth, k, where,
                            tol(engine), f"{engine} {where}")
    # An int compared with a Real field.
    where = {"x": {">": 1289}}
    truth = distances([r for r in rows if sql_matches(r, where)], np.zeros(DIM))
    assert_filtered(coll.nearest("v", np.zeros(DIM), k=50, where=where, engine=engine), truth, 50, where, tol(engine), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_selective_filter_far_from_query_on_large_collection(store: ls.Store, engine: str) -> None:
    """asg017/sqlite-vec#152: three matches among 20,000 rows, all farther than every other row."""
    rng = np.random.default_rng(9)
    coll = declare(store)
    data = rng.normal(size=(20_000, DIM)).astype(np.float32)
    far = {19_997, 19_998, 19_999}
    data[list(far)] += 50.0
    coll.put_many([
        {"id": i, "name": "rare" if i in far else "common", "n": i, "x": float(i), "flag": i in far, "v": data[i]}
        for i in range(20_000)
    ])
    q = np.zeros(DIM, dtype=np.float32)
    for where in ({"name": "rare"}, {"flag": True}, {"n": {">=": 19_997}}, {"x": {">": 19_996.5}}, {"name": {"in": ["rare"]}}):
        for k in (1, 2, 3, 10, 100):
            hits = coll.nearest("v", q, k=k, where=where, engine=engine)
            assert len(hits) == min(k, 3), (where, k)
            assert {h.key for h in hits} <= far
        assert [h.key for h in coll.nearest("v", data[19_998], k=1, where=where, engine=engine)] == [19_998]
    # Unselective: everything but the far rows, nearest first.
    hits = coll.nearest("v", q, k=10, where={"name": "common"}, engine=engine)
    truth = distances([{"id": i, "v": data[i]} for i in range(20_000) if i not in far], q)
    assert_filtered(hits, truth, 10, {"name": "common"}, tol(engine), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_filter_values_follow_writes(store: ls.Store, engine: str) -> None:
    rng = np.random.default_rng(13)
    coll = declare(store)
    rows = [{"id": i, "name": "a", "n": i, "x": float(i), "flag": False, "v": rng.normal(size=DIM)} for i in range(200)]
    coll.put_many(rows)
    q = np.zeros(DIM)
    assert coll.nearest("v", q, k=10, where={"name": "b"}, engine=engine) == []
    coll.nearest("v", q, k=1, engine="cache")  # warm cache
    # Change only filter values (the vector stays), including to and from None.
    coll.put({**rows[10], "name": "b"})
    coll.put({**rows[11], "name": None, "n": None, "x": None, "flag": None})
    coll.put_many([{**rows[i], "flag": True} for i in range(20, 25)])
    with pytest.raises(RuntimeError), store.transaction():
        coll.put({**rows[12], "name": "b"})
        raise RuntimeError("roll back")
    expectations = {
        "b": ({"name": "b"}, [10]),
        "none": ({"name": None}, [11]),
        "n-none": ({"n": None, "flag": None}, [11]),
        "flag": ({"flag": True}, list(range(20, 25))),
    }
    for label, (where, keys) in expectations.items():
        hits = coll.nearest("v", q, k=50, where=where, engine=engine)
        assert sorted(h.key for h in hits) == keys, label
    assert 11 not in {h.key for h in coll.nearest("v", q, k=4096, where={"n": {"<": 1000}}, engine=engine)}
    assert 11 not in {h.key for h in coll.nearest("v", q, k=4096, where={"name": {"!=": "zzz"}}, engine=engine)}
    coll.delete(10)
    assert coll.nearest("v", q, k=10, where={"name": "b"}, engine=engine) == []
    with ls.open(store.path) as fresh:
        other = fresh.collection("items")
        for where, keys in [({"name": "b"}, []), ({"name": None}, [11]), ({"flag": True}, list(range(20, 25)))]:
            assert sorted(h.key for h in other.nearest("v", q, k=50, where=where, engine=engine)) == keys


@pytest.mark.parametrize("engine", ENGINES)
def test_awkward_text_filter_values(store: ls.Store, engine: str) -> None:
    coll = declare(store)
    names = ["it's", '"quoted"', "[1, 2]", "1", "", "naïve ☃", "a\nb", "NULL", "null", "%_"]
    coll.put_many([
        {"id": i, "name": name, "n": i, "x": float(i), "flag": True, "v": [float(i)] + [0.0] * (DIM - 1)}
        for i, name in enumerate(names)
    ])
    coll.put({"id": 100, "name": None, "n": None, "x": None, "flag": None, "v": [0.0] * DIM})
    q = np.zeros(DIM)
    for i, name in enumerate(names):
        assert [h.key for h in coll.nearest("v", q, k=5, where={"name": name}, engine=engine)] == [i], name
        assert [h.key for h in coll.nearest("v", q, k=5, where={"name": {"in": [name]}}, engine=engine)] == [i], name
    assert [h.key for h in coll.nearest("v", q, k=5, where={"name": None}, engine=engine)] == [100]
    hits = coll.nearest("v", q, k=50, where={"name": {"!=": "1"}}, engine=engine)
    assert sorted(h.key for h in hits) == [i for i, name in enumerate(names) if name != "1"]


@pytest.mark.parametrize("engine", ENGINES)
def test_filter_added_by_redeclaration(store: ls.Store, engine: str) -> None:
    rng = np.random.default_rng(17)
    coll = store.collection("items", key="id", fields={"id": ls.Integer(), "v": ls.Vector(DIM, metric="l2")})
    coll.put_many([{"id": i, "v": rng.normal(size=DIM)} for i in range(100)])
    q = np.zeros(DIM)
    coll.nearest("v", q, k=1, engine=engine)
    coll = store.collection("items", key="id", fields={
        "id": ls.Integer(), "v": ls.Vector(DIM, metric="l2"), "group": ls.Text(filter=True),
    })
    coll.put_many([{"id": i, "v": coll.get(i)["v"], "group": "g"} for i in range(0, 100, 10)])
    hits = coll.nearest("v", q, k=50, where={"group": "g"}, engine=engine)
    assert sorted(h.key for h in hits) == list(range(0, 100, 10))
    assert len(coll.nearest("v", q, k=200, where={"group": None}, engine=engine)) == 90
    assert store.verify().ok


INT64_MIN = -(2**63)


@pytest.mark.parametrize(
    "field, value, above",
    [("n", INT64_MIN, 0), ("x", float("-inf"), 0.0), ("name", "\x00localstore:null", "a")],
    ids=["integer", "real", "text"],
)
def test_sentinel_values_are_real_values_on_vec0(store: ls.Store, field: str, value: Any, above: Any) -> None:
    coll = declare(store)
    q = np.zeros(DIM)
    coll.put({"id": 1, "name": "b", "n": 5, "x": 5.0, "flag": True, field: value, "v": q})
    coll.put({"id": 2, "name": None, "n": None, "x": None, "flag": True, "v": q + 1})
    for engine in ENGINES:
        assert [h.key for h in coll.nearest("v", q, k=5, where={field: {"<": above}}, engine=engine)] == [1], engine
        assert [h.key for h in coll.nearest("v", q, k=5, where={field: None}, engine=engine)] == [2], engine
        assert [h.key for h in coll.nearest("v", q, k=5, where={field: {"!=": None}}, engine=engine)] == [1], engine
        assert [h.key for h in coll.nearest("v", q, k=5, where={field: value}, engine=engine)] == [1], engine


@pytest.mark.parametrize("engine", ENGINES)
def test_where_errors(store: ls.Store, engine: str) -> None:
    coll = store.collection("items", key="id", fields={
        "id": ls.Integer(), "name": ls.Text(filter=True), "plain": ls.Text(), "v": ls.Vector(4, metric="l2"),
    })
    coll.put({"id": 1, "name": "a", "plain": "p", "v": [1, 2, 3, 4]})
    q = [0, 0, 0, 0]
    cases: list[tuple[Any, str]] = [
        ({"plain": "p"}, "plain"),  # not declared filter=True
        ({"id": 1}, "id"),
        ({"v": [1, 2, 3, 4]}, "v"),
        ({"nope": 1}, "nope"),
        ({"name": {"~": "a"}}, "name"),
        ({"name": {"like": "a%"}}, "name"),
        ({"name": {}}, "name"),
        ({"name": 3}, "name"),
        ({"name": {"in": "abc"}}, "name"),
        ({"name": {"in": ["a", None]}}, "name"),
        ({"name": {">": None}}, "name"),
    ]
    for where, field in cases:
        with pytest.raises(ls.QueryError) as info:
            coll.nearest("v", q, k=3, where=where, engine=engine)
        assert "items" in str(info.value) and field in str(info.value), (where, str(info.value))
    assert [h.key for h in coll.nearest("v", q, k=3, where={"name": "a"}, engine=engine)] == [1]


def test_filter_option_on_unsupported_types() -> None:
    for field in (ls.Json(filter=True), ls.Blob(filter=True), ls.Array(filter=True), ls.Vector(4, filter=True)):
        with pytest.raises(ls.SchemaError):
            field.bind("items", "f")


def test_too_many_filter_fields(store_path: Path) -> None:
    fields: dict[str, Any] = {"id": ls.Integer(), "v": ls.Vector(4)}
    fields.update({f"f{i}": ls.Integer(filter=True) for i in range(17)})
    with ls.open(store_path) as s:
        with pytest.raises(ls.SchemaError, match="filter"):
            s.collection("items", key="id", fields=fields)
        assert "items" not in s.collections()


def test_many_conditions_stay_exact_on_vec0(tmp_path: Path) -> None:
    """More constraints than sqlite-vec can plan (14) still give exactly the matching nearest rows."""
    store = ls.open(tmp_path / "many.db", vector_cache=False)
    coll = store.collection("c", key="id", fields={
        "id": ls.Integer(), "a": ls.Integer(filter=True), "b": ls.Real(filter=True), "v": ls.Vector(2, metric="l2"),
    })
    coll.put_many([{"id": i, "a": i % 50, "b": float(i), "v": [float(i), 0.0]} for i in range(500)])
    where = {"a": {"!=": 1, "<": 40, ">": 2, ">=": 3, "<=": 39}, "b": {"!=": 3.0, "<": 400.0, ">": 5.0, ">=": 6.0, "<=": 399.0}}
    hits = coll.nearest("v", [0.0, 0.0], k=5, where=where)
    expected = [r["id"] for r in coll.find(where=where, order_by="id")][:5]
    assert [h.key for h in hits] == expected
    store.close()
