"""Similarity queries on a collection: ``nearest`` (exact KNN) and hybrid ``search``.

``nearest`` answers from the in-memory matrix of the field (``knn.VectorCache``)
when the store keeps one, else from the sqlite-vec index; both are exact, and
both apply ``where`` before ranking, so a filtered query returns exactly
``min(k, matching rows)`` hits. ``where`` may use the fields declared
``filter=True``: they are vec0 metadata columns, and indexed in the row table.
A vec0 query first indexes the rows written since the index was last read
(``VectorIndex.catch_up``), so it sees every row the cache would.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._sqlite import boundary, quote
from .errors import QueryError, ReadOnlyStoreError, StoreBusyError, ValidationError
from .fields import Vector
from .query import compile_where
from .search import DEFAULT_FUSION_DEPTH, DEFAULT_FUSION_MIN, DEFAULT_RRF_K, SearchHit, fuse
from .vectors import normalise_probability

if TYPE_CHECKING:
    from .collection import Collection

#: The largest k a query may ask for (sqlite-vec's own limit).
MAX_K = 4096

ENGINES = ("auto", "cache", "vec0")

#: Rows waiting for a vec0 index's catch-up that a query outside a transaction scores itself,
#: beside the index, rather than writing the catch-up (which takes the write lock and commits).
#: Scoring costs ~10 us per waiting 384-d row and query, so the bound stays small: a loop of one
#: put and one vec0 query over 10k 384-d rows costs the same at 0 and 64, 11% more at 256 and
#: 77% more at 2048. 0 makes every such query catch up first.
DEFAULT_PENDING_SCAN = 64


class Hit(NamedTuple):
    """One nearest-neighbour result: the row's key, the row, and its distance (smaller is nearer)."""

    key: Any
    row: dict[str, Any]
    distance: float


def _vector_field(coll: Collection, field: Any) -> Vector:
    spec = coll.fields.get(field) if isinstance(field, str) else None
    if not isinstance(spec, Vector):
        vectors = [n for n, f in coll.fields.items() if isinstance(f, Vector)]
        raise QueryError(
            f"{coll.name}: {field!r} is not a Vector field; vector fields are {', '.join(vectors) or 'none'}"
        )
    return spec


def _queries(spec: Vector, vector: Any) -> tuple[np.ndarray, bool]:
    """Validate one vector or a 2-D batch; return a (m, dim) float32 array and whether it was a batch."""
    if isinstance(vector, np.ndarray) and vector.ndim == 2:
        rows = [spec.as_float32(v) for v in vector]
        batch = True
    else:
        rows = [spec.as_float32(vector)]
        batch = False
    if spec.metric == "fisher_rao":
        rows = [normalise_probability(spec, r) for r in rows]
    if not rows:
        raise ValidationError(f"{spec.collection}.{spec.name}: the query batch is empty")
    return np.stack(rows).astype(np.float32), batch


def _check_k(k: Any, where: str) -> int:
    if isinstance(k, np.integer):
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise QueryError(f"{where}: k must be an int between 1 and {MAX_K}, got {k!r}")
    return k


def _check_filter_where(coll: Collection, where: dict[str, Any] | None) -> list[tuple[str, str, Any]]:
    """Validate a nearest/search ``where`` and return its conditions as (field, op, stored value)."""
    if not where:
        return []
    if not isinstance(where, dict):
        raise QueryError(f"{coll.name}: where must be a dict, got {where!r}")
    filters = coll._derived.filters
    compile_where(coll.schema, where)  # the same validation and errors as find()
    out: list[tuple[str, str, Any]] = []
    for name, condition in where.items():
        if name not in filters:
            raise QueryError(
                f"{coll.name}.{name}: nearest() and search() filter only on fields declared filter=True "
                f"({', '.join(filters) or 'none declared'}); redeclare the field with filter=True"
            )
        field = coll.schema.fields[name]
        tests = condition if isinstance(condition, dict) else {"=": condition}
        for op, value in tests.items():
            op = op.lower()
            if op in ("in", "not in"):
                out.append((name, op, [None if v is None else field.encode(v) for v in value]))
            else:
                out.append((name, op, None if value is None else field.encode(value)))
    return out


def _rows_by_rowid(coll: Collection, rowids: list[int]) -> dict[int, dict[str, Any]]:
    if not rowids:
        return {}
    sql = f"SELECT rowid, {', '.join(quote(n) for n in coll._order)} FROM {coll.schema.table} WHERE rowid IN (SELECT value FROM json_each(?))"
    return {int(r[0]): coll._decode(r[1:]) for r in coll.store._db.execute(sql, (json.dumps(rowids),))}


def nearest(
    coll: Collection, field: str, vector: Any, k: int = 10, where: dict[str, Any] | None = None, engine: str = "auto"
) -> list[Hit] | list[list[Hit]]:
    """The ``k`` rows whose ``field`` is nearest ``vector`` (a list of lists for a 2-D batch)."""
    spec = _vector_field(coll, field)
    k = _check_k(k, f"{coll.name}.{field}")
    if engine not in ENGINES:
        raise QueryError(f"{coll.name}.{field}: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    queries, batch = _queries(spec, vector)
    store = coll.store
    with store._lock, boundary(store.path, f"searching {coll.name}.{field}"):
        store._db  # noqa: B018 - raises StoreClosedError on a closed store
        if not store._depth:
            store._refresh_schemas()
        if engine == "cache" and not store.vector_cache:
            raise QueryError("engine='cache' needs a store opened with vector_cache=True")
        conditions = _check_filter_where(coll, where)
        # Inside a transaction the cache lacks the uncommitted writes (and must not load
        # them, in case of rollback); sqlite-vec sees them.
        use_cache = engine in ("auto", "cache") and not store._depth
        cache = store._vectors.get(coll, field) if use_cache else None
        if cache is not None:
            mask = cache.where_mask(conditions) if conditions else None
            results = cache.search(queries, k, mask)
        else:
            through = _catch_up(coll, field)
            index = coll._derived.vectors[field]  # after the catch-up, which may have reloaded the schema
            waiting = _waiting_rowids(coll, spec, through, conditions) if through is not None else []
            results = [_vec0_exact(coll, spec, index, q, k, where, waiting) for q in queries]
        rows = _rows_by_rowid(coll, sorted({r for result in results for r, _ in result}))
    hits = [[Hit(rows[r][coll.key], rows[r], d) for r, d in result if r in rows] for result in results]
    return hits if batch else hits[0]


def _catch_up(coll: Collection, field: str) -> int | None:
    """Make the vec0 index answer for every row; return W when the rows above it must be scanned instead.

    Inside a transaction the catch-up joins it (and is rolled back with it). Outside,
    a few waiting rows are scanned beside the index, exactly, so a reader writes
    nothing; more are caught up in a write transaction of their own, unless another
    connection keeps the write lock (the query waits at most ``BEGIN_NOW_WAIT_MS``)
    or the file is read-only.
    """
    store = coll.store
    db = store._db
    if store._depth:
        coll._derived.vectors[field].catch_up(db)
        return None
    waiting = coll._derived.vectors[field].waiting(db, DEFAULT_PENDING_SCAN + 1)
    if waiting is None:
        return None
    through, count = waiting
    if count <= DEFAULT_PENDING_SCAN:
        return int(through)
    try:
        # Not waiting long: a writer in another process may hold the lock for a long time, and
        # scanning the waiting rows beside the index gives the same answer, only slower.
        with store._transaction(wait=False):  # which reloads the schema if another process changed it
            coll._derived.vectors[field].catch_up(store._db)
    except (StoreBusyError, ReadOnlyStoreError):
        return int(through)
    return None


def _waiting_rowids(coll: Collection, spec: Vector, through: int, conditions: list[tuple[str, str, Any]]) -> list[int]:
    """The rows above a vec0 index's high-water rowid that have a vector and meet ``conditions``.

    The conditions are tested as the vector cache tests them (``knn.FilterColumn``),
    which is what vec0 matches, NULLs included.
    """
    from .knn import FilterColumn
    from .vector_caches import FILTER_KINDS

    names = list(dict.fromkeys(name for name, _, _ in conditions))
    cols = ", ".join(["rowid", *(quote(n) for n in names)])
    rows = coll.store._db.execute(
        f"SELECT {cols} FROM {coll.schema.table} WHERE rowid > ? AND {quote(spec.name)} IS NOT NULL", (through,)
    ).fetchall()
    keep = np.ones(len(rows), dtype=bool)
    for i, name in enumerate(names, start=1):
        column = FilterColumn(FILTER_KINDS[coll.fields[name].type_name])
        column.resize(len(rows), 0)
        column.put(slice(0, len(rows)), [r[i] for r in rows])
        for field, op, value in conditions:
            if field == name:
                keep &= column.test(op, value, len(rows))
    return [int(r[0]) for r, chosen in zip(rows, keep) if chosen]  # type: ignore[arg-type]


def _vec0_exact(
    coll: Collection, spec: Vector, index: Any, query: np.ndarray, k: int, where: Any, waiting: list[int]
) -> list[tuple[int, float]]:
    """KNN through sqlite-vec, then exact float64 rescoring with the vectors kept in the rows.

    vec0 ranks in float32 (or on quantized codes), so it fetches a margin of extra
    candidates; rescoring restores exact order and distances. ``waiting`` rows (not
    in vec0 yet) join the candidates and are scored the same way.
    """
    from .knn import VectorCache
    from .vectors import DEFAULT_OVERSAMPLE

    fetch = min(MAX_K, k * DEFAULT_OVERSAMPLE[spec.quantize] + 16)
    rowids = index.knn(coll.store._db, query, fetch, where)
    if waiting:
        rowids = list(dict.fromkeys([*rowids, *waiting]))
    if not rowids:
        return []
    sql = f"SELECT rowid, {quote(spec.name)} FROM {coll.schema.table} WHERE rowid IN (SELECT value FROM json_each(?))"
    stored = dict(coll.store._db.execute(sql, (json.dumps(rowids),)))
    ids = [r for r in rowids if stored.get(r) is not None]
    return VectorCache(spec.metric, spec.dim).rescore(ids, [stored[r] for r in ids], query, k)


def search(
    coll: Collection,
    text: str | None = None,
    vector: Any = None,
    k: int = 10,
    where: dict[str, Any] | None = None,
    field: str | None = None,
    rrf_k: int = DEFAULT_RRF_K,
) -> list[SearchHit]:
    """Hybrid search: BM25 over the fulltext fields fused with vector nearness by reciprocal rank fusion."""
    k = _check_k(k, coll.name)
    if text is None and vector is None:
        raise QueryError(f"{coll.name}: search() needs text=, vector=, or both")
    depth = min(MAX_K, max(k * DEFAULT_FUSION_DEPTH, DEFAULT_FUSION_MIN))
    rankings: list[list[int]] = []
    store = coll.store
    if text is not None:
        if not isinstance(text, str):
            raise QueryError(f"{coll.name}: text must be a str, got {type(text).__name__}")
        fts = coll._derived.fulltext
        if fts is None:
            raise QueryError(f"{coll.name}: no field is declared fulltext=True, so text search is not possible")
        with store._lock, boundary(store.path, f"searching {coll.name}"):
            _check_filter_where(coll, where)
            condition, params = compile_where(coll.schema, where) if where else ("", [])
            rankings.append(fts.rank(store._db, text, depth, condition, params))
    else:
        rankings.append([])
    if vector is not None:
        if field is None:
            vectors = list(coll._derived.vectors)
            if len(vectors) != 1:
                raise QueryError(f"{coll.name}: pass field= to say which vector field to search ({', '.join(vectors) or 'none'})")
            field = vectors[0]
        hits = nearest(coll, field, vector, depth, where)
        assert hits and isinstance(hits[0], Hit) or not hits
        rowid_of = _rowids_for_keys(coll, [h.key for h in hits])  # type: ignore[union-attr]
        rankings.append([rowid_of[h.key] for h in hits])  # type: ignore[union-attr]
    else:
        rankings.append([])
    fused = fuse(rankings, rrf_k)[:k]
    with store._lock, boundary(store.path, f"searching {coll.name}"):
        rows = _rows_by_rowid(coll, [r for r, _, _ in fused])
    return [
        SearchHit(rows[r][coll.key], rows[r], score, ranks[0], ranks[1]) for r, score, ranks in fused if r in rows
    ]


def _rowids_for_keys(coll: Collection, keys: list[Any]) -> dict[Any, int]:
    if not keys:
        return {}
    with coll.store._lock:
        return dict(coll.store._db.execute(coll._sql_rowids, (json.dumps(keys),)))
