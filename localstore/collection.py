"""A collection: a table with a declared schema; rows are plain dicts in and out.

Writes go through one SQLite transaction each (or join the caller's
``store.transaction()``) and append their change records in it. A change record
for a put refers to the row as stored; a temporary trigger copies the row's
stored values into the record ("materialises" it) just before the row is
overwritten or deleted, so every record keeps the row as it was written while a
fresh insert costs no second copy of the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import apsw
import msgpack
import numpy as np

from ._sqlite import boundary, quote, scalar
from .derived import DerivedIndexes
from .encoders import compile_encoders
from .errors import ValidationError
from .fields import Field, Integer, raise_bad_text
from .query import check_limit, compile_fields, compile_order, compile_where
from .schema import CollectionSchema

if TYPE_CHECKING:
    from .store import Store

OP_PUT = 1
OP_DELETE = 2
OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete"}

#: Batches of at least this many rows go through a plain INSERT (~10% less work per row than the
#: upsert) until a key exists, the rest through the upsert; smaller ones (a put()) upsert alone.
_INSERT_FIRST = 16

#: Bytes of vectors checked finite per numpy call by put_many.
_CHECK_BYTES = 4 << 20

#: Below this, SQLite numbers new rows max(rowid) + 1; at 2**63 - 1 it would pick random rowids.
_SEQUENTIAL_ROWIDS = 2**62


class _SchemaMoved(Exception):
    """Internal: a row named a field this process had not seen, and the reloaded schema has it."""


class _Projection:
    """A read of some fields only: its SELECT list and a decoder that touches only those columns."""

    def __init__(self, coll: Collection, names: tuple[str, ...]) -> None:
        self.names = names
        self.select = f"SELECT {', '.join(quote(n) for n in names)} FROM {coll._schema.table}"
        codecs = coll._codec.fields if coll._codec is not None else {}
        decoders = dict(coll._decoders)
        self.plan = [(n, codecs.get(n), decoders[n]) for n in names]
        self.codec = coll._codec if any(n in codecs for n in names) else None

    def decode(self, stored: Sequence[Any]) -> dict[str, Any]:
        """Decode one selected row (key first); codec fields are decrypted and decompressed only when chosen."""
        key = stored[0]
        out: dict[str, Any] = {}
        for (name, codec, decode), value in zip(self.plan, stored):
            if value is None:
                out[name] = None
            elif codec is not None:
                out[name] = codec.decode(value, key)
            elif decode is not None:
                out[name] = decode(value)
            else:
                out[name] = value
        return out


class Collection:
    """A declared collection inside a store. Get one from ``store.collection(...)``."""

    def __init__(self, store: Store, schema: CollectionSchema) -> None:
        self.store = store
        self._set_schema(schema)

    # -- schema-derived plans ---------------------------------------------------------

    def _set_schema(self, schema: CollectionSchema) -> None:
        self._schema = schema
        self.name = schema.name
        self.key = schema.key
        self._fields = schema.fields
        self._field_set = frozenset(schema.fields)
        key_first = [schema.key] + [n for n in schema.fields if n != schema.key]
        self._order = tuple(key_first)
        self._plan = [(n, schema.fields[n], schema.fields[n].default, schema.fields[n].nullable) for n in key_first]
        self._derived = DerivedIndexes(schema)
        self._vector_positions = {n: key_first.index(n) for n in self._derived.vectors}
        self._filter_positions = [key_first.index(n) for n in self._derived.filters]
        self._compile_encoders()
        self._decoders = [
            (n, schema.fields[n].decode if type(schema.fields[n]).decode is not Field.decode else None)
            for n in key_first
        ]
        table, kcol = schema.table, quote(schema.key)
        cols = ", ".join(quote(n) for n in key_first)
        marks = ", ".join("?" for _ in key_first)
        updates = ", ".join(f"{quote(n)}=excluded.{quote(n)}" for n in key_first[1:])
        updates = (updates + ", " if updates else "") + "_ls_seq=excluded._ls_seq, _ls_hlc=excluded._ls_hlc"
        upsert = (
            f"INSERT INTO {table}({cols}, _ls_seq, _ls_hlc) VALUES({marks}, ?, ?) "
            f"ON CONFLICT({kcol}) DO UPDATE SET {updates}"
        )
        insert = f"INSERT INTO {table}({cols}, _ls_seq, _ls_hlc) VALUES({marks}, ?, ?)"
        log = f"INSERT INTO _ls_changes(seq, hlc, coll, key, op) VALUES(?, ?, {schema.id}, ?, {OP_PUT})"
        self._sql_put = upsert
        self._sql_put_logged = f"{upsert}; {log}"
        self._sql_insert = insert
        self._sql_insert_logged = f"{insert}; {log}"
        # One row into a collection with derived indexes: what is there first, then an INSERT or the upsert.
        self._sql_probe = f"SELECT max(rowid), (SELECT rowid FROM {table} WHERE {kcol} = ?) FROM {table}"
        self._sql_insert_one = f"{insert} RETURNING rowid"
        self._sql_insert_one_logged = f"{insert} RETURNING rowid; {log}"
        self._sql_select = f"SELECT {cols} FROM {table}"
        self._sql_get = f"{self._sql_select} WHERE {kcol} = ?"
        self._sql_delete = f"DELETE FROM {table} WHERE {kcol} = ? RETURNING rowid"
        self._sql_rowids = f"SELECT {kcol}, rowid FROM {table} WHERE {kcol} IN (SELECT value FROM json_each(?))"
        self._sql_log_delete = f"INSERT INTO _ls_changes(seq, hlc, coll, key, op) VALUES(?, ?, {schema.id}, ?, {OP_DELETE})"
        self._sql_pack = "ls_pack(" + ", ".join(f"'{n}', {quote(n)}" for n in key_first) + ")"
        self._projections: dict[tuple[str, ...], _Projection] = {}
        if schema.sync:
            self._install_triggers()

    def _install_triggers(self) -> None:
        """(Re)create the temporary triggers that materialise a change record before its row changes."""
        schema = self._schema
        pack = "ls_pack(" + ", ".join(f"'{n}', OLD.{quote(n)}" for n in self._order) + ")"
        db = self.store._db
        with boundary(self.store.path, f"preparing collection {self.name!r}"):
            for event in ("UPDATE", "DELETE"):
                trigger = quote(f"_ls_keep_{event.lower()}_{schema.name}")
                db.execute(
                    f"DROP TRIGGER IF EXISTS temp.{trigger}; "
                    f"CREATE TEMP TRIGGER {trigger} BEFORE {event} ON main.{schema.table} "
                    f"WHEN OLD._ls_seq IS NOT NULL BEGIN "
                    f"UPDATE main._ls_changes SET payload = {pack} WHERE seq = OLD._ls_seq AND payload IS NULL; END"
                )

    @property
    def schema(self) -> CollectionSchema:
        """The collection's schema as kept in the store."""
        return self._schema

    @property
    def fields(self) -> dict[str, Field]:
        """The declared fields by name."""
        return dict(self._fields)

    def __repr__(self) -> str:
        return f"<localstore.Collection {self.name!r} key={self.key!r} fields={list(self._fields)}>"

    # -- encoding -----------------------------------------------------------------------

    def _compile_encoders(self) -> None:
        """Generate the per-row encoders for this schema (see ``encoders.py``)."""
        built = compile_encoders(self)
        self._encode_logged, self._encode_plain = built.logged, built.plain
        self._fast_vectors, self._codec = built.fast_vectors, built.codec

    def _as_dict(self, row: Any) -> dict[str, Any]:
        if not isinstance(row, Mapping):
            raise ValidationError(f"{self.name}: a row must be a dict of field -> value, got {type(row).__name__}")
        return dict(row)

    def _bad_row(self, row: dict[str, Any]) -> None:
        self.store._refresh_schemas()
        unknown = [k for k in row if k not in self._field_set]
        if unknown:
            raise ValidationError(
                f"{self.name}: unknown field(s) {', '.join(map(repr, unknown))}; declared fields are "
                f"{', '.join(self._fields)}. Redeclare the collection with the new field to add it"
            )
        raise _SchemaMoved()

    def _raise_bad_text(self, bindings: list[tuple[Any, ...]]) -> None:
        """Name the field whose text SQLite could not take as UTF-8 (a lone surrogate)."""
        raise_bad_text(self.name, ((values[0], name, value) for values in bindings
                                   for name, value in zip(self._order, values)))

    def _missing(self, name: str) -> None:
        if name == self.key:
            raise ValidationError(f"{self.name}: the row has no key; {self.key!r} is required")
        raise ValidationError(f"{self.name}.{name}: a value is required (the field is not nullable)")

    def _check_key(self, key: Any) -> Any:
        if key is None:
            raise ValidationError(f"{self.name}: the key {self.key!r} cannot be None")
        encoded = self._fields[self.key].encode(key)
        if isinstance(encoded, str) and not encoded.isascii():  # SQLite cannot take a lone surrogate
            raise_bad_text(self.name, [(key, self.key, encoded)])
        return encoded

    def _decode(self, stored: Sequence[Any]) -> dict[str, Any]:
        if self._codec is not None:
            return self._codec.decode_row(stored)
        return {
            name: (value if decode is None or value is None else decode(value))
            for (name, decode), value in zip(self._decoders, stored)
        }

    def decode_payload(self, payload: dict[str, Any] | bytes) -> dict[str, Any]:
        """Turn a change payload (stored values by field) into a row of Python values."""
        if isinstance(payload, (bytes, bytearray)):
            payload = msgpack.unpackb(payload, raw=False)
        assert isinstance(payload, dict)
        if self._codec is not None:
            return self._codec.decode_payload(payload)
        return {
            name: (payload.get(name) if decode is None or payload.get(name) is None else decode(payload[name]))
            for name, decode in self._decoders
            if name in payload
        }

    # -- writes ---------------------------------------------------------------------------

    def put(self, row: dict[str, Any]) -> Any:
        """Insert or replace the row with this key (fields left out take their default); return the key."""
        self._write([row])
        return row[self.key]

    def put_many(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert or replace many rows in one transaction, all or none; return the count."""
        batch = rows if isinstance(rows, (list, tuple)) else list(rows)
        if batch:
            self._write(batch)
        return len(batch)

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        store = self.store
        with store.transaction():
            logged = self._schema.sync
            seq, hlc = store._allocate(len(rows), logged)
            for attempt in (0, 1):
                encode = self._encode_logged if logged else self._encode_plain
                try:
                    bindings = [encode(row, seq + i, hlc + i) for i, row in enumerate(rows)]
                    break
                except _SchemaMoved:
                    # Another connection added fields; the schema was reloaded, so encode again.
                    if attempt:
                        raise ValidationError(f"{self.name}: the collection's schema keeps changing; retry") from None
            if self._fast_vectors:
                self._check_vectors(rows, bindings)
            with boundary(store.path, f"writing to {self.name!r}"):
                derived = not self._derived.empty
                try:
                    if derived and len(bindings) == 1:
                        rowids, old_max = self._put_one(bindings[0], logged)
                    else:
                        # Rows that get a rowid above the current maximum are new: nothing to replace
                        # in their derived indexes.
                        old_max = scalar(store._db, f"SELECT max(rowid) FROM {self._schema.table}") or 0 if derived else 0
                        done = self._insert_fresh(bindings, logged) if len(bindings) >= _INSERT_FIRST else 0
                        if done < len(bindings):
                            store._db.executemany(self._sql_put_logged if logged else self._sql_put,
                                                  bindings[done:] if done else bindings)
                        rowids = self._rowids_of(bindings, old_max) if derived else []
                except UnicodeEncodeError:
                    self._raise_bad_text(bindings)
                    raise
                if derived:
                    self._derived.write(store._db, rowids, bindings, old_max)
                    fpos = self._filter_positions
                    for name, pos in self._vector_positions.items():
                        if (self.name, name) in store._vectors.caches:  # else note() drops the list unread
                            store._vectors.note(
                                self.name, name, [(r, b[pos], tuple(b[p] for p in fpos)) for r, b in zip(rowids, bindings)]
                            )

    def _put_one(self, binding: tuple[Any, ...], logged: bool) -> tuple[list[int], int]:
        """Write one row of a collection with derived indexes; return ``[its rowid]`` and the largest rowid before.

        One probe tells both, so a new row takes a plain INSERT and an existing one the
        upsert, with no second look (``_rowids_of``) afterwards.
        """
        db = self.store._db
        old_max, existing = db.execute(self._sql_probe, (binding[0],)).fetchone()  # type: ignore[misc]
        if existing is None:
            found = db.execute(self._sql_insert_one_logged if logged else self._sql_insert_one, binding).fetchall()
            return [int(found[0][0])], int(old_max or 0)  # type: ignore[arg-type]
        db.execute(self._sql_put_logged if logged else self._sql_put, binding)
        return [int(existing)], int(old_max or 0)

    def _insert_fresh(self, bindings: list[tuple[Any, ...]], logged: bool) -> int:
        """Write rows with plain INSERTs until one's key exists; return how many were written.

        A failed INSERT undoes only itself, so the caller upserts the rest, that row included
        (any other constraint failure is raised again by that upsert).
        """
        db = self.store._db
        before = db.total_changes()
        try:
            db.executemany(self._sql_insert_logged if logged else self._sql_insert, bindings)
        except apsw.ConstraintError:
            # No trigger fires on an INSERT: a row counts one change, two with its change record.
            return (db.total_changes() - before) // (2 if logged else 1)
        return len(bindings)

    def update(self, key: Any, changes: Mapping[str, Any]) -> Any:
        """Change only the named fields of the row with this key; return the key.

        Values are validated (and encrypted, compressed, indexed) as by ``put``; fields
        left out keep their stored values, untouched. The change log records the row as
        it now stands. A key without a row raises ``NotFoundError`` and writes nothing.
        """
        from .update import update_rows

        update_rows(self, [(key, changes)])
        return key

    def update_many(
        self, changes: Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]]
    ) -> int:
        """Apply ``{key: {field: value}}`` (or ``(key, {field: value})`` pairs) in one transaction, all or none; return the count."""
        from .update import as_items, update_rows

        return update_rows(self, as_items(changes))

    def _check_vectors(self, rows: Sequence[Any], bindings: list[tuple[Any, ...]]) -> None:
        """Check that the vectors the encoder took as bytes are finite: a few numpy calls per field and batch."""
        for pos, name, field in self._fast_vectors:
            stored = [b[pos] for b in bindings if b[pos] is not None]
            # A few MB at a time, so isfinite reads the joined bytes from the CPU cache (3x faster).
            step = max(1, _CHECK_BYTES // (field.dim * 4))
            if all(np.isfinite(np.frombuffer(b"".join(stored[i:i + step]), dtype="<f4")).all()
                   for i in range(0, len(stored), step)):
                continue
            for row in rows:  # find the row to blame; encode() raises the usual error for it
                value = row.get(name) if isinstance(row, Mapping) else None
                if value is not None:
                    field.encode(value)

    def _rowids_of(self, bindings: list[tuple[Any, ...]], old_max: int) -> list[int]:
        """The rowids of rows just written, in the order of ``bindings``; ``old_max`` is the max rowid before."""
        if isinstance(self._fields[self.key], Integer):
            return [int(b[0]) for b in bindings]  # an Integer key is the rowid itself
        # SQLite gives a new row the largest rowid + 1, so if the batch added exactly as many
        # rowids as it has rows, every row was an insert, numbered in binding order. Else
        # (keys replaced, or one key twice) look the rowids up.
        new_max = scalar(self.store._db, f"SELECT max(rowid) FROM {self._schema.table}") or 0
        if new_max - old_max == len(bindings) and new_max < _SEQUENTIAL_ROWIDS:
            return list(range(old_max + 1, new_max + 1))
        found = dict(self.store._db.execute(self._sql_rowids, (json.dumps([b[0] for b in bindings]),)))
        return [found[b[0]] for b in bindings]

    def delete(self, key: Any) -> bool:
        """Delete the row with this key; return whether one existed."""
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[Any]) -> int:
        """Delete the rows with these keys in one transaction; return how many existed."""
        checked = [self._check_key(k) for k in keys]
        if not checked:
            return 0
        store = self.store
        with store.transaction():
            return self._delete_checked(checked)

    def _delete_checked(self, keys: list[Any]) -> int:
        """Delete rows by encoded key inside the current transaction, logging each; return the count."""
        store = self.store
        db = store._db
        deleted = []
        rowids = []
        with boundary(store.path, f"deleting from {self.name!r}"):
            for key in keys:
                gone = db.execute(self._sql_delete, (key,)).fetchall()
                if gone:
                    deleted.append(key)
                    rowids.append(int(gone[0][0]))  # type: ignore[arg-type]
            if rowids and not self._derived.empty:
                self._derived.delete(db, rowids)
                for name in self._vector_positions:
                    store._vectors.note(self.name, name, [(r, None, None) for r in rowids])
            if deleted:
                seq, hlc = store._allocate(len(deleted), self._schema.sync)
                if self._schema.sync:
                    db.executemany(self._sql_log_delete, [(seq + i, hlc + i, k) for i, k in enumerate(deleted)])
        return len(deleted)

    # -- reads -------------------------------------------------------------------------------

    def _projection(self, fields: Any) -> _Projection:
        """The read plan of ``fields=[...]`` (validated; cached per tuple of names)."""
        cache_key = tuple(fields) if isinstance(fields, (list, tuple)) else None
        try:
            plan = self._projections.get(cache_key) if cache_key is not None else None
        except TypeError:  # an unhashable item: compile_fields names it
            plan = cache_key = None
        if plan is not None:
            return plan
        try:
            names = compile_fields(self._schema, fields)
        except ValidationError:
            # Another connection may have added the field: reload the schema once and look again.
            self.store._run(lambda db: None, f"reading {self.name!r}")
            names = compile_fields(self._schema, fields)
        plan = _Projection(self, names)
        if cache_key is not None and len(self._projections) < 64:
            self._projections[cache_key] = plan
        return plan

    def _reader(self, fields: Any) -> tuple[str, Any, Any]:
        """The SELECT, the row decoder and the codec to prime, for all fields (None) or a projection."""
        if fields is None:
            return self._sql_select, self._decode, self._codec
        plan = self._projection(fields)
        return plan.select, plan.decode, plan.codec

    def get(self, key: Any, *, fields: list[str] | tuple[str, ...] | None = None) -> dict[str, Any] | None:
        """The row with this key, or None; ``fields=[...]`` returns only those fields (and the key)."""
        checked = self._check_key(key)

        def read(db: Any) -> tuple[Any, Any, Any]:
            # Planned inside the read: _run first reloads schemas another process changed.
            select, decode, codec = self._reader(fields)
            sql = self._sql_get if fields is None else f"{select} WHERE {quote(self.key)} = ?"
            return db.execute(sql, (checked,)).fetchone(), decode, codec

        found, decode, codec = self.store._run(read, f"reading {self.name!r}")
        if found is not None and codec is not None:
            codec.begin_read()
        return None if found is None else decode(found)

    def get_many(
        self, keys: Iterable[Any], *, fields: list[str] | tuple[str, ...] | None = None
    ) -> list[dict[str, Any] | None]:
        """The rows with these keys, in the same order; None where a key has no row. ``fields=`` as in ``get``."""
        checked = [self._check_key(k) for k in keys]
        if not checked:
            self._reader(fields)  # still validates fields=
            return []
        def read(db: Any) -> tuple[Any, Any, Any]:
            select, decode, codec = self._reader(fields)
            sql = f"{select} WHERE {quote(self.key)} IN (SELECT value FROM json_each(?))"
            return db.execute(sql, (json.dumps(checked),)).fetchall(), decode, codec

        rows, decode, codec = self.store._run(read, f"reading {self.name!r}")
        by_key = {row[0]: row for row in rows}
        if rows and codec is not None:
            codec.begin_read()
        return [None if (row := by_key.get(k)) is None else decode(row) for k in checked]

    def __contains__(self, key: Any) -> bool:
        return self.get(key, fields=()) is not None

    def find(
        self,
        where: dict[str, Any] | None = None,
        *,
        fields: list[str] | tuple[str, ...] | None = None,
        order_by: str | list[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows matching ``where``, ordered by ``order_by`` (``"-field"`` descends), then in storage order.

        Storage order is insertion order for Text keys and key order for Integer keys.

        ``where`` maps a field to a value (equality; None means IS NULL) or to
        ``{op: value}`` with op one of ``= != < <= > >= in``; conditions are ANDed.
        ``fields=[...]`` returns only those fields (the key always comes too); the
        others are neither read into Python nor decrypted nor decompressed.
        """
        def read(db: Any) -> tuple[Any, Any, Any]:
            select, decode, codec = self._reader(fields)
            sql, params = self._select_sql(select, where, order_by, limit, offset)
            return db.execute(sql, params).fetchall(), decode, codec

        rows, decode, codec = self.store._run(read, f"querying {self.name!r}")
        if rows and codec is not None:
            codec.begin_read()
        return [decode(row) for row in rows]

    def keys(self, where: dict[str, Any] | None = None, *, limit: int | None = None) -> list[Any]:
        """The keys of the rows matching ``where``, in storage order (see ``find``)."""
        def read(db: Any) -> list[Any]:
            select = f"SELECT {quote(self.key)} FROM {self._schema.table}"
            sql, params = self._select_sql(select, where, None, limit, None)
            return list(db.execute(sql, params).fetchall())

        return [r[0] for r in self.store._run(read, f"querying {self.name!r}")]

    def _select_sql(
        self, select: str, where: Any, order_by: Any, limit: Any, offset: Any
    ) -> tuple[str, list[Any]]:
        condition, params = compile_where(self._schema, where)
        order = compile_order(self._schema, order_by)
        limit, offset = check_limit(limit, "limit"), check_limit(offset, "offset")
        sql = select
        if condition:
            sql += f" WHERE {condition}"
        sql += f" ORDER BY {order + ', ' if order else ''}rowid"
        if limit is not None or offset is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset or 0]
        return sql, params

    def nearest(
        self, field: str, vector: Any, k: int = 10, where: dict[str, Any] | None = None, *, engine: str = "auto"
    ) -> Any:
        """The ``k`` rows whose vector ``field`` is nearest ``vector``, as ``Hit(key, row, distance)``, nearest first.

        ``vector`` may be a 2-D numpy array of queries; then one list of hits per row
        is returned. ``where`` may use fields declared ``filter=True`` and is applied
        before ranking, so exactly ``min(k, matching rows)`` hits come back. Distances
        are the field's metric: cosine distance (1 - cos), L2, L1, or the Fisher-Rao
        distance 2·arccos(Σ√(pq)). ``engine`` is ``"auto"`` (the in-memory matrix when
        the store keeps one), ``"cache"`` or ``"vec0"`` (sqlite-vec); all are exact.
        """
        from .nearest import nearest

        return nearest(self, field, vector, k, where, engine)

    def search(
        self,
        text: str | None = None,
        vector: Any = None,
        k: int = 10,
        where: dict[str, Any] | None = None,
        *,
        field: str | None = None,
    ) -> Any:
        """Hybrid search: BM25 over ``fulltext=True`` fields fused with vector nearness (reciprocal rank fusion).

        Either ``text`` or ``vector`` may be given alone. Returns ``SearchHit(key, row,
        score, text_rank, vector_rank)``, best first, ties in a fixed order.
        """
        from .nearest import search

        return search(self, text, vector, k, where, field)

    def count(self, where: dict[str, Any] | None = None) -> int:
        """The number of rows matching ``where`` (all rows if None)."""
        def read(db: Any) -> Any:
            condition, params = compile_where(self._schema, where)
            sql = f"SELECT count(*) FROM {self._schema.table}" + (f" WHERE {condition}" if condition else "")
            return scalar(db, sql, params)

        return int(self.store._run(read, f"counting {self.name!r}"))

    def __len__(self) -> int:
        return self.count()

    def __iter__(self) -> Any:
        return iter(self.find())

