"""Vector indexes: one sqlite-vec ``vec0`` table per Vector field, kept in step with the rows.

The row table is the source of truth (it holds the vector too); the vec0 table
is derived and rebuilt by ``store.reindex()``. Each vec0 row has the row's rowid,
the vector (as float32, or quantized to int8), and one metadata column
per ``filter=True`` field of the collection, so filtered KNN runs inside vec0
and returns exactly ``min(k, matching)`` hits.

vec0 metadata columns cannot hold NULL, so a None filter value is stored as a
sentinel and every comparison on that column also excludes the sentinel, which
keeps SQL's NULL semantics.

Fresh inserts are indexed lazily. Each index has a high-water rowid W, kept in
``_ls_vec_state``: every row with rowid <= W that has a vector is in vec0 (with
its current vector and filter values), and vec0 holds no row above W. A write to
a row above W leaves vec0 alone; writes to rows at or below W maintain it at once.
``catch_up`` indexes the rows above W in one bulk INSERT ... SELECT and raises W
to the largest rowid; it runs in the write transaction before anything reads vec0.
An index with no W (a store written before W existed) was maintained row by row,
so it is complete: the first write sets W to the rowid its rows start above.
"""

from __future__ import annotations

import json
import math
import operator
from typing import TYPE_CHECKING, Any

import apsw
import numpy as np

from ._sqlite import quote, scalar
from .errors import QueryError, SchemaError, ValidationError
from .fields import Boolean, Field, Integer, Real, Text, Vector
from .virtual import VirtualIndex

if TYPE_CHECKING:
    from .schema import CollectionSchema

#: sqlite-vec's distance_metric for each of our metrics. Fisher-Rao indexes sqrt(p) by cosine.
VEC0_METRIC = {"cosine": "cosine", "l2": "L2", "l1": "L1", "fisher_rao": "cosine"}

#: Candidates fetched from vec0 per wanted hit before exact float64 rescoring, by index type.
#: Float indexes only need a margin against float32 rounding; quantized ones need more:
#: int8 keeps recall@10 at 0.95-1.0 with 8x (measured by benchmarks/run.py vectors).
DEFAULT_OVERSAMPLE: dict[str | None, int] = {None: 2, "int8": 8}

#: Vectors per vec0 chunk (sqlite-vec's default is 1024). An insert writes into the chunk's
#: blob at the row's offset, which costs more the longer the blob: at 384 dims, 256 rows per
#: chunk insert ~25% faster than 1024 with the same KNN scan time (benchmarks/peers.py).
DEFAULT_VEC0_CHUNK = 256

#: The table of high-water rowids, one row per vec0 table. Its name starts with _ls_vec, so
#: replication and store fingerprints pass it over like the vec0 tables it describes.
STATE_TABLE = "_ls_vec_state"
_STATE_DDL = f"CREATE TABLE IF NOT EXISTS {STATE_TABLE}(tbl TEXT PRIMARY KEY, high_water INTEGER NOT NULL) STRICT, WITHOUT ROWID"

#: A high-water mark above every rowid: "index every row now", for writers that cannot tell new rows.
NO_HIGH_WATER = 2**63 - 1
#: The high-water mark of a new, empty index: below every rowid (Integer keys may be 0 or negative).
LOWEST_ROWID = -(2**63)

#: Rows per executemany when an index is filled through Python (Fisher-Rao roots).
_FILL_BATCH = 10_000

_SENTINEL_TEXT = "\x00localstore:null"
_SENTINEL_INT = -(2**63)
_VEC0_TYPES: dict[type[Field], str] = {Text: "text", Integer: "integer", Real: "float", Boolean: "integer"}
_MAX_METADATA = 16
_MAX_NOT_IN = 8
_MAX_VEC0_CONSTRAINTS = 12


def vec_table(collection: str, field: str) -> str:
    """The quoted name of the vec0 table indexing ``collection.field``."""
    return quote(f"_ls_vec.{collection}.{field}")


def filter_fields(schema: CollectionSchema) -> list[str]:
    """The collection's ``filter=True`` fields, checked for types vec0 can hold."""
    names = [n for n, f in schema.fields.items() if f.filter]
    for name in names:
        if type(schema.fields[name]) not in _VEC0_TYPES:
            raise SchemaError(
                f"{schema.name}.{name}: filter=True works on Text, Integer, Real and Boolean fields, "
                f"not {schema.fields[name].type_name}"
            )
    if len(names) > _MAX_METADATA:
        raise SchemaError(f"{schema.name}: at most {_MAX_METADATA} fields may be declared filter=True")
    return names


def _meta(name: str) -> str:
    """The vec0 metadata column of a filter field: prefixed, so no name clashes with vec0's own columns.

    vec0's parser takes bare names only; field names are validated identifiers, so that is safe.
    """
    return f"m_{name}"


def _sentinel(field: Field) -> Any:
    if isinstance(field, Text):
        return _SENTINEL_TEXT
    if isinstance(field, Real):
        return -math.inf
    return _SENTINEL_INT


def _sentinel_sql(sentinel: Any) -> str:
    """A sentinel as a SQL expression (the text one holds a NUL, which a SQL literal cannot)."""
    if sentinel == _SENTINEL_TEXT:
        return "(char(0) || '" + _SENTINEL_TEXT[1:] + "')"
    if sentinel == -math.inf:
        return "-9e999"
    assert sentinel == _SENTINEL_INT
    return str(_SENTINEL_INT)


def fisher_rao_root(vector: np.ndarray) -> np.ndarray:
    """sqrt(p) of a probability vector: the point whose cosine geometry gives Fisher-Rao order."""
    return np.asarray(np.sqrt(np.maximum(vector, 0.0, dtype=np.float32), dtype=np.float32))


def normalise_probability(field: Vector, array: np.ndarray) -> np.ndarray:
    """Check a Fisher-Rao vector is non-negative with a positive sum, and scale it to sum to 1."""
    if (array < 0).any():
        raise ValidationError(
            f"{field.collection}.{field.name}: a fisher_rao vector must be non-negative (a probability "
            f"distribution); found {float(array.min())}"
        )
    total = float(array.sum(dtype=np.float64))
    if not total > 0:
        raise ValidationError(f"{field.collection}.{field.name}: a fisher_rao vector must have a positive sum")
    return (array / np.float32(total)).astype("<f4")


class VectorIndex(VirtualIndex):
    """The vec0 index of one Vector field: its DDL, write maintenance and KNN query."""

    def __init__(self, schema: CollectionSchema, field_name: str) -> None:
        self.schema = schema
        self.field_name = field_name
        field = schema.fields[field_name]
        assert isinstance(field, Vector)
        self.field = field
        self.table = vec_table(schema.name, field_name)
        self.filters = filter_fields(schema)
        order = [schema.key] + [n for n in schema.fields if n != schema.key]
        self.vector_pos = order.index(field_name)
        self.filter_pos = [order.index(n) for n in self.filters]
        self.sentinels = [_sentinel(schema.fields[n]) for n in self.filters]
        quant = field.quantize
        self.value_sql = {None: "?", "int8": "vec_quantize_int8(?, 'unit')"}[quant]
        cols = ", ".join(["rowid", "embedding", *(_meta(n) for n in self.filters)])
        # None becomes the sentinel inside SQLite, so a batch needs no per-value work in Python.
        marks = ", ".join(["?", self.value_sql, *(f"coalesce(?, {_sentinel_sql(s)})" for s in self.sentinels)])
        self.sql_insert = f"INSERT INTO {self.table}({cols}) VALUES({marks})"
        self._pick = operator.itemgetter(self.vector_pos, *self.filter_pos)
        self.sql_delete = f"DELETE FROM {self.table} WHERE rowid = ?"
        self.name = f"_ls_vec.{schema.name}.{field_name}"
        # sqlite-vec's shadow table of indexed rowids: a rowid b-tree, so ranges over it are cheap.
        self.rowids_table = quote(f"{self.name}_rowids")
        vector = quote(field_name) if quant is None else f"vec_quantize_int8({quote(field_name)}, 'unit')"
        self.sql_fill = (
            f"INSERT INTO {self.table}({cols}) SELECT rowid, {vector}"
            + "".join(f", coalesce({quote(n)}, {_sentinel_sql(s)})" for n, s in zip(self.filters, self.sentinels))
            + f" FROM {schema.table} WHERE rowid >= ? AND {quote(field_name)} IS NOT NULL ORDER BY rowid"
        )

    # -- DDL --------------------------------------------------------------------------------

    def ddl(self) -> str:
        """The CREATE VIRTUAL TABLE statement for this index."""
        dim = self.field.dim
        kind = {None: f"float[{dim}]", "int8": f"int8[{dim}]"}[self.field.quantize]
        metric = f" distance_metric={VEC0_METRIC[self.field.metric]}"
        meta = "".join(f", {_meta(n)} {_VEC0_TYPES[type(self.schema.fields[n])]}" for n in self.filters)
        chunk = f", chunk_size={DEFAULT_VEC0_CHUNK}"
        return f"CREATE VIRTUAL TABLE IF NOT EXISTS {self.table} USING vec0(embedding {kind}{metric}{meta}{chunk})"

    def create(self, db: apsw.Connection) -> None:
        """Create the table if missing; its W starts below every rowid, so rows written from now on wait for a catch-up."""
        super().create(db)
        self.set_high_water(db, LOWEST_ROWID)

    def rebuild(self, db: apsw.Connection) -> int:
        """Recreate the index from the row table (reclaiming deleted slots); return the rows indexed."""
        self.drop(db)
        self.create(db)
        count = self._fill(db, LOWEST_ROWID)
        top = self._top(db)
        if top is not None:
            self.set_high_water(db, top)
        return count

    # -- the high-water rowid ----------------------------------------------------------------

    def high_water(self, db: apsw.Connection) -> int | None:
        """W, read from the file (never cached: another connection may have moved it); None if never set."""
        try:
            row = db.execute(f"SELECT high_water FROM {STATE_TABLE} WHERE tbl = ?", (self.name,)).fetchone()
        except apsw.SQLError:  # no state table yet: a store written before W existed
            return None
        return None if row is None else int(row[0])

    def indexed_through(self, db: apsw.Connection) -> int:
        """The rowid up to which writes must keep vec0 in step (every rowid for an index without W)."""
        found = self.high_water(db)
        return NO_HIGH_WATER if found is None else found

    def set_high_water(self, db: apsw.Connection, value: int) -> None:
        """Store W for this index (inside the caller's write transaction)."""
        db.execute(_STATE_DDL)
        db.execute(
            f"INSERT INTO {STATE_TABLE}(tbl, high_water) VALUES(?, ?) "
            "ON CONFLICT(tbl) DO UPDATE SET high_water = excluded.high_water",
            (self.name, value),
        )

    def _top(self, db: apsw.Connection) -> int | None:
        """The largest rowid of the row table, None if it is empty."""
        top = scalar(db, f"SELECT max(rowid) FROM {self.schema.table}")
        return None if top is None else int(top)

    def waiting(self, db: apsw.Connection, limit: int) -> tuple[int, int] | None:
        """(W, rows above W, counted up to ``limit``) when rows wait for the catch-up, else None.

        Cheap (b-tree lookups and a bounded range count), for readers outside a transaction.
        """
        found = self.high_water(db)
        top = self._top(db) if found is not None else None
        if top is None or found is None or top <= found:
            return None
        count = scalar(db, f"SELECT count(*) FROM (SELECT 1 FROM {self.schema.table} WHERE rowid > ? LIMIT ?)",
                       (found, limit))
        return found, int(count)

    def catch_up(self, db: apsw.Connection) -> int:
        """Index every row above W in bulk, then raise W to the largest rowid; return the rows indexed.

        Runs inside a write transaction and is rolled back with it. Entries above W
        (which only a writer unaware of W leaves) are replaced, so the insert never collides.
        """
        found = self.high_water(db)
        if found is None:
            return 0
        top = self._top(db)
        if top is None or top <= found:
            return 0
        stale = db.execute(f"SELECT rowid FROM {self.rowids_table} WHERE rowid > ?", (found,)).fetchall()
        if stale:
            db.executemany(self.sql_delete, stale)
        count = self._fill(db, found + 1)
        self.set_high_water(db, top)
        return count

    def _fill(self, db: apsw.Connection, start: int) -> int:
        """Insert entries for every row from rowid ``start`` up that has a vector; return how many."""
        if self.field.metric != "fisher_rao":
            db.execute(self.sql_fill, (start,))
            return int(db.changes())
        # Fisher-Rao indexes sqrt(p), computed in numpy a batch at a time.
        cols = ", ".join(quote(n) for n in [self.field_name, *self.filters])
        rows = db.execute(
            f"SELECT rowid, {cols} FROM {self.schema.table} WHERE rowid >= ? AND {quote(self.field_name)} IS NOT NULL "
            "ORDER BY rowid",
            (start,),
        )
        count = 0
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= _FILL_BATCH:
                db.executemany(self.sql_insert, self._entries(batch))
                count, batch = count + len(batch), []
        if batch:
            db.executemany(self.sql_insert, self._entries(batch))
            count += len(batch)
        return count

    # -- writes ------------------------------------------------------------------------------

    def _entries(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Insert bindings from (rowid, stored vector, filter values...) rows that have a vector."""
        if self.field.metric != "fisher_rao" or not rows:
            return rows
        # Fisher-Rao is indexed by sqrt(p): one numpy pass over the whole batch.
        dim = self.field.dim * 4
        roots = fisher_rao_root(np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")).tobytes()
        return [(r[0], roots[i * dim:(i + 1) * dim], *r[2:]) for i, r in enumerate(rows)]

    def insert(self, db: apsw.Connection, rowids: list[int], bindings: list[tuple[Any, ...]]) -> None:
        """Add index entries for rows just written (``bindings`` are the encoded rows); old ones are gone."""
        pick, pos = self._pick, self.vector_pos
        if self.filter_pos:
            rows = [(rowid, *pick(b)) for rowid, b in zip(rowids, bindings) if b[pos] is not None]
        else:
            rows = [(rowid, b[pos]) for rowid, b in zip(rowids, bindings) if b[pos] is not None]
        if rows:
            db.executemany(self.sql_insert, self._entries(rows))

    def update_filters(self, db: apsw.Connection, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Set the filter (metadata) columns ``names`` of existing entries in place: rows are (values..., rowid).

        Values are stored values (None becomes the column's sentinel). Rows without a
        vector have no entry, and the UPDATE leaves them be; the vector is not rewritten.
        """
        sentinels = [self.sentinels[self.filters.index(n)] for n in names]
        sets = ", ".join(f"{_meta(n)} = ?" for n in names)
        db.executemany(
            f"UPDATE {self.table} SET {sets} WHERE rowid = ?",
            [(*(s if v is None else v for v, s in zip(row, sentinels)), row[-1]) for row in rows],
        )

    def delete(self, db: apsw.Connection, rowids: list[int]) -> None:
        """Remove the index entries of deleted rows."""
        db.executemany(self.sql_delete, [(r,) for r in rowids])

    # -- queries -----------------------------------------------------------------------------

    def compile_filter(self, db: apsw.Connection, where: dict[str, Any] | None) -> tuple[str, list[Any]]:
        """Turn a ``where`` on filter fields into vec0 constraints.

        Comparisons and IN on Text/Integer/Boolean run as vec0 metadata constraints;
        NOT IN becomes a chain of ``!=``. What vec0 cannot express exactly (IN on a
        Real column, or a field whose real values include the NULL sentinel) becomes
        ``rowid IN (SELECT rowid FROM rows WHERE ...)``, which vec0 also applies
        during the scan, so no hit is lost either way.
        """
        if not where:
            return "", []
        clauses: list[str] = []
        params: list[Any] = []
        fallback: dict[str, Any] = {}
        for name, condition in where.items():
            if name not in self.filters:
                raise QueryError(
                    f"{self.schema.name}.{name}: nearest() filters only on fields declared filter=True "
                    f"({', '.join(self.filters) or 'none declared'})"
                )
            field = self.schema.fields[name]
            sentinel = self.sentinels[self.filters.index(name)]
            tests = condition if isinstance(condition, dict) else {"=": condition}
            ops = {str(op).lower(): value for op, value in tests.items()}
            collides = db.execute(
                f"SELECT 1 FROM {self.schema.table} WHERE {quote(name)} = ? LIMIT 1", (sentinel,)
            ).fetchone()
            # vec0 cannot plan more than a handful of constraints per query, so a long NOT IN
            # list is filtered through the row table instead.
            long_not_in = len(ops.get("not in") or ()) > _MAX_NOT_IN
            if collides or long_not_in or (isinstance(field, Real) and "in" in ops):
                fallback[name] = condition
                continue
            column = _meta(name)
            for op, value in ops.items():
                op = {"==": "="}.get(op, op)
                if op == "in":
                    values = [field.encode(v) for v in value if v is not None]
                    if any(v is None for v in value):
                        values.append(sentinel)
                    clauses.append(f"{column} IN (SELECT value FROM json_each(?))")
                    params.append(json.dumps(values))
                elif op == "not in":
                    for v in [*(field.encode(v) for v in value if v is not None), sentinel]:
                        clauses.append(f"{column} != ?")
                        params.append(v)
                elif value is None and op in ("=", "!="):
                    clauses.append(f"{column} {op} ?")
                    params.append(sentinel)
                elif op in ("=", "!=", "<", "<=", ">", ">="):
                    clauses.append(f"{column} {op} ?")
                    params.append(field.encode(value))
                    if op != "=":
                        clauses.append(f"{column} != ?")
                        params.append(sentinel)
                else:
                    raise QueryError(f"{self.schema.name}.{name}: unknown operator {op!r}")
        from .query import compile_where

        if len(clauses) > _MAX_VEC0_CONSTRAINTS:
            # sqlite-vec plans at most 14 metadata constraints: filter the whole where through the rows.
            clauses, params, fallback = [], [], dict(where)
        if fallback:
            condition, extra = compile_where(self.schema, fallback)
            clauses.append(f"rowid IN (SELECT rowid FROM {self.schema.table} WHERE {condition})")
            params += extra
        return " AND ".join(clauses), params

    def knn(
        self, db: apsw.Connection, query: np.ndarray, fetch: int, where: dict[str, Any] | None
    ) -> list[int]:
        """The row ids of the ``fetch`` nearest by sqlite-vec, filters applied inside vec0, nearest first."""
        condition, params = self.compile_filter(db, where)
        probe = fisher_rao_root(query) if self.field.metric == "fisher_rao" else query
        sql = (
            f"SELECT rowid FROM {self.table} WHERE embedding MATCH {self.value_sql} AND k = ?"
            + (f" AND {condition}" if condition else "")
            + " ORDER BY distance"
        )
        return [int(r[0]) for r in db.execute(sql, [probe.astype("<f4").tobytes(), fetch, *params])]
