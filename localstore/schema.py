"""The store's own tables and the collection schemas kept in the file.

Internal tables all start with ``_ls_``:
  _ls_meta         key/value facts about the store: its id, format, watermark.
  _ls_collections  one row per collection: its key, fields (JSON), sync flag, TTL.
  _ls_changes      the change log (see ``changelog.py``); ``_ls_meta.last_seq`` is its
                   counter, which only grows, so a seq is never reused even after pruning.
A collection's rows live in a table of the collection's own name; each row also
carries ``_ls_seq`` (the change that last wrote it) and ``_ls_hlc`` (when).
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import apsw

from . import clock
from ._sqlite import quote, scalar
from .errors import CorruptStoreError, NotAStoreError, SchemaError
from .fields import KEY_TYPES, Field
from .names import check_identifier

#: The on-disk format version written by this code.
FORMAT_VERSION = 1

INTERNAL_DDL = """
CREATE TABLE IF NOT EXISTS _ls_meta(key TEXT PRIMARY KEY, value ANY) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ls_collections(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    key_field TEXT NOT NULL,
    fields TEXT NOT NULL,
    sync INTEGER NOT NULL,
    ttl REAL,
    created_hlc INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS _ls_changes(
    seq INTEGER PRIMARY KEY,
    hlc INTEGER NOT NULL,
    coll INTEGER NOT NULL,
    key ANY NOT NULL,
    op INTEGER NOT NULL,
    payload BLOB
) STRICT;
"""

SYSTEM_COLUMNS = ("_ls_seq", "_ls_hlc")


@dataclass
class CollectionSchema:
    """A collection's declared shape, as kept in ``_ls_collections``."""

    id: int
    name: str
    key: str
    fields: dict[str, Field]
    sync: bool = True
    ttl: float | None = None
    columns: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self.columns = tuple(self.fields)

    @functools.cached_property
    def table(self) -> str:
        """The quoted table name."""
        return quote(self.name)


def check_store_file(conn: apsw.Connection, path: str) -> None:
    """Refuse a SQLite file that belongs to another program (tables, but no localstore metadata)."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'")}
    if names and "_ls_meta" not in names:
        raise NotAStoreError(
            f"{path} is a SQLite database of another program (it has tables but no localstore "
            "metadata); it was left untouched. Use a new path for the store"
        )


def init_store(conn: apsw.Connection, path: str) -> str:
    """Create the internal tables on a new store, or check an existing one; return the store id."""
    row = conn.execute("SELECT name FROM sqlite_schema WHERE type='table' AND name='_ls_meta'").fetchone()
    if row is not None:
        found = conn.execute("SELECT value FROM _ls_meta WHERE key='store_id'").fetchone()
        if found is None:
            raise NotAStoreError(f"{path} has a _ls_meta table but no store id; it is not a localstore store")
        version = conn.execute("SELECT value FROM _ls_meta WHERE key='format'").fetchone()
        if version is not None and int(version[0]) > FORMAT_VERSION:
            raise NotAStoreError(
                f"{path} uses store format {version[0]}, newer than this localstore understands "
                f"({FORMAT_VERSION}); upgrade localstore"
            )
        return str(found[0])
    others = scalar(conn, "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'")
    if others:
        raise NotAStoreError(
            f"{path} is a SQLite database of another program (it has tables but no localstore "
            "metadata); it was left untouched. Use a new path for the store"
        )
    store_id = str(uuid.uuid4())
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have initialised the file while we waited for the lock.
        if conn.execute("SELECT 1 FROM sqlite_schema WHERE name='_ls_meta'").fetchone() is None:
            conn.execute(INTERNAL_DDL)
            conn.executemany(
                "INSERT INTO _ls_meta(key, value) VALUES(?, ?)",
                [("store_id", store_id), ("format", FORMAT_VERSION), ("created_hlc", clock.wall_hlc()), ("watermark", 0), ("last_seq", 0)],
            )
        else:
            store_id = str(scalar(conn, "SELECT value FROM _ls_meta WHERE key='store_id'"))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return store_id


def load_schema(conn: apsw.Connection, name: str) -> CollectionSchema | None:
    """Read one collection's schema from the file, or None if it does not exist."""
    row = conn.execute(
        "SELECT id, name, key_field, fields, sync, ttl FROM _ls_collections WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        return None
    cid, stored_name, key, fields_json, sync, ttl = row
    try:
        specs = json.loads(fields_json)
        fields = {fname: Field.from_spec(spec).bind(stored_name, fname) for fname, spec in specs.items()}
    except (ValueError, TypeError, AttributeError, KeyError, SchemaError) as exc:
        raise CorruptStoreError(
            f"the stored schema of collection {name!r} is damaged ({exc}); restore the store from a backup"
        ) from None
    return CollectionSchema(cid, stored_name, key, fields, bool(sync), ttl)


def list_collections(conn: apsw.Connection) -> list[str]:
    """The names of every collection in the store, in creation order."""
    return [row[0] for row in conn.execute("SELECT name FROM _ls_collections ORDER BY id")]


def _check_declaration(name: str, key: str, fields: dict[str, Any]) -> dict[str, Field]:
    check_identifier(name, "collection")
    if not isinstance(fields, dict) or not fields:
        raise SchemaError(f"collection {name!r}: fields must be a non-empty dict of name -> field type")
    bound: dict[str, Field] = {}
    seen: set[str] = set()
    for fname, ftype in fields.items():
        check_identifier(fname, "field")
        if fname.lower() in seen:
            raise SchemaError(f"collection {name!r}: field names {fname!r} collide (SQLite names ignore case)")
        seen.add(fname.lower())
        if isinstance(ftype, type) and issubclass(ftype, Field):
            ftype = ftype()
        if not isinstance(ftype, Field):
            raise SchemaError(f"{name}.{fname}: expected a field type such as ls.Text(), got {ftype!r}")
        bound[fname] = ftype.bind(name, fname)
    if not isinstance(key, str) or key not in bound:
        raise SchemaError(f"collection {name!r}: key {key!r} must name one of the declared fields ({', '.join(bound)})")
    key_field = bound[key]
    if not isinstance(key_field, KEY_TYPES):
        raise SchemaError(f"{name}.{key}: a key must be Text or Integer, not {key_field.type_name}")
    if any(f.encrypt or f.compress for f in bound.values()):
        from .codecs import check_declaration

        check_declaration(name, key, bound)
    return bound


def _column_ddl(fname: str, f: Field, key: str) -> str:
    if fname == key:
        return f"{quote(fname)} {f.sql_type} PRIMARY KEY NOT NULL"
    ddl = f"{quote(fname)} {'ANY' if f.sql_type == '' else f.sql_type}"
    return ddl


def _index_name(collection: str, fname: str) -> str:
    # "." cannot appear in collection or field names, so two pairs never share an index name.
    return quote(f"_ls_ix.{collection}.{fname}")


def declare(
    conn: apsw.Connection,
    name: str,
    key: str,
    fields: dict[str, Any],
    *,
    sync: bool = True,
    ttl: float | None = None,
) -> CollectionSchema:
    """Create a collection, or reconcile a redeclaration with the stored schema.

    Must run inside a write transaction. New fields are added as columns; index
    options are applied; a changed type, key, nullability or sync flag is refused.
    """
    bound = _check_declaration(name, key, fields)
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
        raise SchemaError(f"collection {name!r}: ttl must be a positive number of seconds, or None")
    existing = load_schema(conn, name)
    if existing is None:
        clash = conn.execute("SELECT name FROM sqlite_schema WHERE name = ? COLLATE NOCASE", (name,)).fetchone()
        if clash is not None:
            raise SchemaError(f"collection name {name!r} clashes with existing table or index {clash[0]!r}")
        columns = [_column_ddl(fname, f, key) for fname, f in bound.items()]
        columns += ["_ls_seq INTEGER", "_ls_hlc INTEGER NOT NULL"]
        conn.execute(f"CREATE TABLE {quote(name)} ({', '.join(columns)}) STRICT")
        for fname, f in bound.items():
            if f.index and fname != key:
                conn.execute(f"CREATE INDEX {_index_name(name, fname)} ON {quote(name)}({quote(fname)})")
        if ttl is not None:
            conn.execute(f"CREATE INDEX {_index_name(name, '_hlc')} ON {quote(name)}(_ls_hlc)")
        specs = {fname: f.spec() for fname, f in bound.items()}
        conn.execute(
            "INSERT INTO _ls_collections(name, key_field, fields, sync, ttl, created_hlc) VALUES(?,?,?,?,?,?)",
            (name, key, json.dumps(specs), int(bool(sync)), None if ttl is None else float(ttl), clock.wall_hlc()),
        )
        created = load_schema(conn, name)
        assert created is not None
        return created
    return _reconcile(conn, existing, key, bound, sync, ttl)


def _reconcile(
    conn: apsw.Connection,
    existing: CollectionSchema,
    key: str,
    bound: dict[str, Field],
    sync: bool,
    ttl: float | None,
) -> CollectionSchema:
    name = existing.name
    if key != existing.key:
        raise SchemaError(
            f"collection {name!r} is keyed by {existing.key!r} in the store; it cannot be redeclared with key "
            f"{key!r}. Create a new collection and copy the rows instead"
        )
    if bool(sync) != existing.sync:
        raise SchemaError(f"collection {name!r} has sync={existing.sync} in the store; it cannot change to sync={sync}")
    merged = dict(existing.fields)
    for fname, f in bound.items():
        old = next((o for oname, o in existing.fields.items() if oname.lower() == fname.lower()), None)
        if old is None:
            if not f.nullable and f.default is None:
                raise SchemaError(
                    f"{name}.{fname}: a field added to an existing collection must be nullable or have a default"
                )
            conn.execute(f"ALTER TABLE {quote(name)} ADD COLUMN {_column_ddl(fname, f, key)}")
            if f.default is not None:
                conn.execute(f"UPDATE {quote(name)} SET {quote(fname)} = ?", (f.encode(f.default),))
            if f.index:
                conn.execute(f"CREATE INDEX {_index_name(name, fname)} ON {quote(name)}({quote(fname)})")
            merged[fname] = f
            continue
        if old.name != fname:
            raise SchemaError(f"{name}.{fname}: the store spells this field {old.name!r}; names must match exactly")
        reason = f.incompatible_with(old)
        if reason:
            raise SchemaError(
                f"{name}.{fname} is {reason}; a field's type and options cannot change in place. "
                "Add a new field instead"
            )
        if f.index != old.index and fname != key:
            if f.index:
                conn.execute(f"CREATE INDEX IF NOT EXISTS {_index_name(name, fname)} ON {quote(name)}({quote(fname)})")
            else:
                conn.execute(f"DROP INDEX IF EXISTS {_index_name(name, fname)}")
        merged[fname] = f
    if ttl is not None or existing.ttl is not None:
        if ttl is None:
            ttl = existing.ttl  # a redeclaration without ttl keeps the stored one
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_index_name(name, '_hlc')} ON {quote(name)}(_ls_hlc)")
    specs = {fname: f.spec() for fname, f in merged.items()}
    conn.execute(
        "UPDATE _ls_collections SET fields = ?, ttl = ? WHERE id = ?",
        (json.dumps(specs), None if ttl is None else float(ttl), existing.id),
    )
    updated = load_schema(conn, name)
    assert updated is not None
    return updated


def set_ttl(conn: apsw.Connection, schema: CollectionSchema, ttl: float | None) -> None:
    """Change a collection's time-to-live, in seconds; None keeps rows forever."""
    if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
        raise SchemaError(f"collection {schema.name!r}: ttl must be a positive number of seconds, or None")
    if ttl is not None:
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_index_name(schema.name, '_hlc')} ON {schema.table}(_ls_hlc)")
    conn.execute("UPDATE _ls_collections SET ttl = ? WHERE id = ?", (ttl, schema.id))
