"""Store-internal operations for replication: the sync engine's restore and pull use them.

- ``collection_specs``: every collection's stored schema, read in one query.
- ``create_with_id``: a new store file that carries a given store id.
- ``load_restored``: rows as stored, written with their original seq and HLC, the
  counters moved past them, so the restored store continues its seq without reuse.
- ``apply_remote``: rows written by other stores, merged last-writer-wins by
  (HLC, store id), not logged as local changes, and marked with their origin.

Rows are written as stored (encoded, encrypted, compressed), never re-encoded.
A pulled row gets no change record, so it never ships back: a new key carries
``_ls_seq = 0`` (below any change), an overwritten local row keeps its ``_ls_seq``
(the UPDATE trigger first copies the old values into that change record, so the
record still describes the local write). The origin (store id and HLC) lives in
``_ls_origin``; an entry is current only while the row still carries that HLC (a
local write always gets a later one), so a later local write makes the row local
again without touching this table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._sqlite import boundary, quote
from .errors import StoreOpenError
from .fields import Field
from .store import Store
from .vectors import NO_HIGH_WATER

#: The ``_ls_seq`` of a row pulled from another store for a key with no local row.
PULLED_SEQ = 0

REPLICA_DDL = """
CREATE TABLE IF NOT EXISTS _ls_origin(coll INTEGER NOT NULL, key ANY NOT NULL, store_id TEXT NOT NULL,
    hlc INTEGER NOT NULL, PRIMARY KEY(coll, key)) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ls_subscriptions(collection TEXT PRIMARY KEY, cursor TEXT NOT NULL DEFAULT '0') STRICT;
"""

#: Tables that may hold compression dictionaries, with their column names (id, collection, field, data).
DICTIONARY_TABLES = ("_ls_dicts", "_ls_dictionaries")


@dataclass(frozen=True)
class RemoteRow:
    """A row written by another store: its key, stored values (None for a delete), origin store id and HLC."""

    key: Any
    values: dict[str, Any] | None
    store_id: str
    hlc: int


def collection_specs(store: Store) -> list[dict[str, Any]]:
    """Every collection's schema as stored: name, key, field specs, sync flag and TTL, in creation order."""
    rows = store._run(
        lambda db: db.execute("SELECT name, key_field, fields, sync, ttl FROM _ls_collections ORDER BY id").fetchall(),
        "reading collection schemas",
    )
    return [{"name": n, "key": k, "fields": json.loads(f), "sync": bool(s), "ttl": t} for n, k, f, s, t in rows]


def local_dictionaries(store: Store) -> list[dict[str, Any]]:
    """The store's compression dictionaries as ``{dict_id, collection, field, data}`` (none before compression exists)."""
    def read(db: Any) -> list[dict[str, Any]]:
        for table in DICTIONARY_TABLES:
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({quote(table)})")]
            if not cols:
                continue
            pick = {
                "dict_id": next((c for c in cols if c in ("dict_id", "id")), None),
                "collection": next((c for c in cols if c in ("collection", "coll")), None),
                "field": next((c for c in cols if c == "field"), None),
                "data": next((c for c in cols if c in ("data", "dictionary", "dict")), None),
            }
            if pick["dict_id"] is None or pick["data"] is None:
                continue
            names = [v for v in pick.values() if v is not None]
            out = []
            for row in db.execute(f"SELECT {', '.join(map(quote, names))} FROM {quote(table)}"):
                rec = dict(zip([k for k, v in pick.items() if v is not None], row))
                out.append({"dict_id": int(rec["dict_id"]), "collection": rec.get("collection"),
                            "field": rec.get("field"), "data": bytes(rec["data"])})
            return out
        return []

    return store._run(read, "reading compression dictionaries")  # type: ignore[no-any-return]


#: Internal tables owned by the engine or by this module; everything else named ``_ls*`` is replicated
#: as a whole (keys wrapped by the master key, dictionaries, ...), except derived index tables.
_NOT_REPLICATED = ("_ls_changes", "_ls_collections", "_ls_origin", "_ls_subscriptions")
_DERIVED_PREFIXES = ("_ls_vec", "_ls_fts", "_ls_ix")

#: ``_ls_meta`` entries that are positions of this copy of the store, not facts to restore.
_LOCAL_META = ("store_id", "last_seq", "watermark", "hlc_floor", "pruned_through", "format", "created_hlc")


def internal_tables(store: Store) -> list[dict[str, Any]]:
    """Small internal tables to ship whole (``{name, ddl, columns, rows}``), for restore to bring back.

    Covers whatever later features keep beside the data (wrapped data keys, compression
    dictionaries), plus the ``_ls_meta`` facts that are not positions of this copy.
    """
    def read(db: Any) -> list[dict[str, Any]]:
        out = []
        meta = [(k, v) for k, v in db.execute("SELECT key, value FROM _ls_meta") if k not in _LOCAL_META]
        out.append({"name": "_ls_meta", "ddl": None, "columns": ["key", "value"], "rows": meta})
        tables = db.execute(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name LIKE '\\_ls%' ESCAPE '\\' ORDER BY name"
        ).fetchall()
        for name, ddl in tables:
            if name in _NOT_REPLICATED or name == "_ls_meta" or name.startswith(_DERIVED_PREFIXES) or not ddl:
                continue
            if ddl.upper().startswith("CREATE VIRTUAL"):
                continue
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({quote(name)})")]
            rows = [tuple(r) for r in db.execute(f"SELECT {', '.join(map(quote, cols))} FROM {quote(name)}")]
            if name == "_ls_keys":
                rows = _withhold_subject_keys(cols, rows)
            out.append({"name": name, "ddl": ddl, "columns": cols, "rows": rows})
        return out

    return store._run(read, "reading internal tables")  # type: ignore[no-any-return]


def _withhold_subject_keys(columns: list[str], rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Subject keys never leave the store: Postgres gets their ids only, as backups do.

    ``store.forget(subject)`` must reach every copy, and a key that was never shipped
    needs no erasing centrally. The price: a store restored from Postgres reads its
    subject-encrypted values as ``localstore.FORGOTTEN`` (documented in docs/privacy.md).
    """
    kind, wrapped, lookup, state = (columns.index(c) for c in ("kind", "wrapped", "lookup", "state"))
    out = []
    for row in rows:
        if row[kind] == "subject":
            masked = list(row)
            masked[wrapped] = masked[lookup] = None
            masked[state] = "withheld" if row[state] == "live" else row[state]
            row = tuple(masked)
        out.append(row)
    return out


def fingerprint(store: Store) -> str:
    """A cheap digest of what ``collection_specs`` and ``internal_tables`` would return, to skip re-reading them.

    Uses the schema version, the non-position ``_ls_meta`` entries, and per replicated
    table its row count and total value length (SQLite reads lengths from record headers).
    """
    def read(db: Any) -> str:
        parts: list[Any] = [db.execute("PRAGMA schema_version").fetchone()[0]]
        marks = ", ".join("?" for _ in _LOCAL_META)
        parts.append(db.execute(f"SELECT group_concat(key || '=' || quote(value)) FROM _ls_meta WHERE key NOT IN ({marks})",
                                _LOCAL_META).fetchone()[0])
        parts.append(db.execute("SELECT group_concat(name || fields) FROM _ls_collections").fetchone()[0])
        for (name,) in db.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE '\\_ls%' ESCAPE '\\' ORDER BY name"
        ).fetchall():
            if name in _NOT_REPLICATED or name == "_ls_meta" or name.startswith(_DERIVED_PREFIXES):
                continue
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({quote(name)})")]
            if not cols:
                continue
            lengths = " + ".join(f"total(length({quote(c)}))" for c in cols)
            parts.append((name, *db.execute(f"SELECT count(*), {lengths} FROM {quote(name)}").fetchone()))
        return repr(parts)

    return store._run(read, "fingerprinting the store's schema")  # type: ignore[no-any-return]


def load_internal_tables(store: Store, tables: list[dict[str, Any]]) -> None:
    """Bring back internal tables shipped by ``internal_tables`` (creating any the store lacks)."""
    with store.transaction(), boundary(store.path, "restoring internal tables"):
        db = store._db
        for t in tables:
            name, cols = t["name"], t["columns"]
            if name == "_ls_meta":
                db.executemany("INSERT OR IGNORE INTO _ls_meta(key, value) VALUES(?, ?)",
                               [r for r in t["rows"] if r[0] not in _LOCAL_META])
                continue
            exists = db.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (name,)).fetchone()
            if not exists and t["ddl"]:
                db.execute(t["ddl"])
            rows = [tuple(r) for r in t["rows"]]
            if name == "_ls_keys" and "state" in cols:
                # Subject keys never reach Postgres (see _withhold_subject_keys): with no live
                # copy to borrow them from, their values read as FORGOTTEN in the restored store.
                state = cols.index("state")
                rows = [r[:state] + ("forgotten",) + r[state + 1 :] if r[state] == "withheld" else r for r in rows]
            if rows:
                marks = ", ".join("?" for _ in cols)
                db.executemany(f"INSERT OR IGNORE INTO {quote(name)}({', '.join(map(quote, cols))}) VALUES({marks})",
                               rows)


def create_with_id(path: str | os.PathLike[str], store_id: str, **options: Any) -> Store:
    """Create a new store at ``path`` that carries ``store_id``; refuse if the file exists."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise StoreOpenError(f"{path} already exists; restore into a new path (or move the old file away)")
    store = Store(path, **options)
    try:
        with store.transaction(), boundary(path, "setting the store id"):
            store._db.execute("UPDATE _ls_meta SET value = ? WHERE key = 'store_id'", (store_id,))
    finally:
        store.close()
    return Store(path, **options)


def declare_from_spec(store: Store, spec: dict[str, Any]) -> None:
    """Declare a collection from a stored schema spec (as ``collection_specs`` returns)."""
    fields: dict[str, Field | type[Field]] = {
        str(name): Field.from_spec(fspec) for name, fspec in spec["fields"].items()}
    store.collection(spec["name"], spec["key"], fields, sync=spec["sync"], ttl=spec["ttl"])


def _ensure_replica_tables(store: Store) -> None:
    store._db.execute(REPLICA_DDL)


def load_restored(store: Store, collection: str, rows: Iterable[tuple[dict[str, Any], int, int]]) -> int:
    """Write rows ``(stored values, seq, hlc)`` into a collection as they were, without logging; return the count.

    Call ``finish_restore`` after the last collection.
    """
    coll = store.collection(collection)
    order = coll._order
    cols = ", ".join(quote(n) for n in order)
    marks = ", ".join("?" for _ in order)
    sql = f"INSERT INTO {coll._schema.table}({cols}, _ls_seq, _ls_hlc) VALUES({marks}, ?, ?)"
    count = 0
    with store.transaction(), boundary(store.path, f"restoring {collection!r}"):
        db = store._db
        batch = []
        for values, seq, hlc in rows:
            batch.append((*[values.get(n) for n in order], seq, hlc))
            if len(batch) >= 5000:
                db.executemany(sql, batch)
                count += len(batch)
                batch = []
        if batch:
            db.executemany(sql, batch)
            count += len(batch)
    _reindex(coll)
    return count


def finish_restore(store: Store, last_seq: int, last_hlc: int) -> None:
    """Move the seq counter, watermark, pruned mark and clock floor past everything restored."""
    with store.transaction(), boundary(store.path, "finishing the restore"):
        db = store._db
        for key, value in (("last_seq", last_seq), ("watermark", last_seq), ("pruned_through", last_seq),
                           ("hlc_floor", last_hlc)):
            db.execute(
                "INSERT INTO _ls_meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                (key, value),
            )


def _reindex(coll: Any) -> None:
    """Rebuild derived indexes (vec0, FTS) and caches of a collection after rows were written directly."""
    fn = getattr(coll.store, "reindex", None)
    if callable(fn):
        fn(coll.name)


def subscribe(store: Store, collection: str) -> None:
    """Subscribe the store to a collection as written by other stores; the sync engine pulls it."""
    with store.transaction(), boundary(store.path, "subscribing"):
        _ensure_replica_tables(store)
        store._db.execute("INSERT OR IGNORE INTO _ls_subscriptions(collection) VALUES(?)", (collection,))


def unsubscribe(store: Store, collection: str) -> None:
    """Stop pulling a collection (rows already pulled stay)."""
    with store.transaction(), boundary(store.path, "unsubscribing"):
        _ensure_replica_tables(store)
        store._db.execute("DELETE FROM _ls_subscriptions WHERE collection = ?", (collection,))


def subscriptions(store: Store) -> dict[str, str]:
    """The subscribed collections and their pull cursors."""
    def read(db: Any) -> dict[str, str]:
        if db.execute("SELECT 1 FROM sqlite_schema WHERE name = '_ls_subscriptions'").fetchone() is None:
            return {}
        return {c: cur for c, cur in db.execute("SELECT collection, cursor FROM _ls_subscriptions")}

    return store._run(read, "reading subscriptions")  # type: ignore[no-any-return]


def apply_remote(store: Store, collection: str, rows: Iterable[RemoteRow], cursor: str | None = None) -> int:
    """Merge rows written by other stores, last-writer-wins by (HLC, store id); return how many were applied.

    A remote row replaces the local one only if its (HLC, store id) is later than the
    local row's: the local store's own id and HLC, or the origin kept for a pulled row.
    Deletes remove the row. Nothing is logged; the clock moves past every HLC seen.
    ``cursor`` (the pull position) is saved in the same transaction.
    """
    coll = store.collection(collection)
    sch = coll._schema
    table, kcol = sch.table, quote(sch.key)
    order = coll._order
    cols = ", ".join(quote(n) for n in order)
    marks = ", ".join("?" for _ in order)
    # An upsert, not INSERT OR REPLACE: it fires the UPDATE trigger that keeps an
    # unshipped local change record's payload before the row is overwritten.
    updates = ", ".join(f"{quote(n)}=excluded.{quote(n)}" for n in order[1:])
    upsert = (f"INSERT INTO {table}({cols}, _ls_seq, _ls_hlc) VALUES({marks}, ?, ?) "
              f"ON CONFLICT({kcol}) DO UPDATE SET {updates + ', ' if updates else ''}"
              "_ls_seq=excluded._ls_seq, _ls_hlc=excluded._ls_hlc")
    applied = 0
    max_hlc = 0
    written: list[tuple[int, tuple[Any, ...]]] = []
    removed: list[int] = []
    with store.transaction(), boundary(store.path, f"applying pulled rows to {collection!r}"):
        db = store._db
        _ensure_replica_tables(store)
        for row in rows:
            if row.store_id == store.id:
                continue
            key = coll._check_key(row.key)
            max_hlc = max(max_hlc, row.hlc)
            found = db.execute(f"SELECT _ls_seq, _ls_hlc FROM {table} WHERE {kcol} = ?", (key,)).fetchone()
            if found is not None:
                local = (found[1], store.id)
                origin = db.execute("SELECT store_id, hlc FROM _ls_origin WHERE coll = ? AND key = ?",
                                    (sch.id, key)).fetchone()
                if origin is not None and origin[1] == found[1]:
                    local = (origin[1], origin[0])
                if (row.hlc, row.store_id) <= local:
                    continue
            elif row.values is None:
                # Nothing to delete; remember the tombstone so an older remote put cannot resurrect it.
                db.execute("INSERT OR REPLACE INTO _ls_origin(coll, key, store_id, hlc) VALUES(?, ?, ?, ?)",
                           (sch.id, key, row.store_id, row.hlc))
                continue
            else:
                tomb = db.execute("SELECT store_id, hlc FROM _ls_origin WHERE coll = ? AND key = ?",
                                  (sch.id, key)).fetchone()
                if tomb is not None and (row.hlc, row.store_id) <= (tomb[1], tomb[0]):
                    continue
            if row.values is None:
                gone = db.execute(f"DELETE FROM {table} WHERE {kcol} = ? RETURNING rowid", (key,)).fetchall()
                removed += [int(r[0]) for r in gone]  # type: ignore[arg-type]
            else:
                values = dict(row.values)
                values[sch.key] = key
                keep_seq = found[0] if found is not None and found[0] else PULLED_SEQ
                binding = (*[values.get(n) for n in order], keep_seq, row.hlc)
                db.execute(upsert, binding)
                rowid = db.execute(f"SELECT rowid FROM {table} WHERE {kcol} = ?", (key,)).fetchone()
                written.append((int(rowid[0]), binding))  # type: ignore[index]
            db.execute("INSERT OR REPLACE INTO _ls_origin(coll, key, store_id, hlc) VALUES(?, ?, ?, ?)",
                       (sch.id, key, row.store_id, row.hlc))
            applied += 1
        if max_hlc:
            db.execute(
                "INSERT INTO _ls_meta(key, value) VALUES('hlc_floor', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                (max_hlc,),
            )
        if cursor is not None:
            db.execute("INSERT INTO _ls_subscriptions(collection, cursor) VALUES(?, ?) "
                       "ON CONFLICT(collection) DO UPDATE SET cursor = excluded.cursor", (collection, cursor))
        _update_derived(coll, written, removed)
    return applied


def _update_derived(coll: Any, written: list[tuple[int, tuple[Any, ...]]], removed: list[int]) -> None:
    """Keep a collection's vec0/FTS indexes and vector caches in step with rows applied directly."""
    derived = coll._derived
    if derived.empty or not (written or removed):
        return
    db, store = coll.store._db, coll.store
    if written:
        # One batch may put a key and then delete it: such a row is gone, not written (else its
        # entries would be re-added after the delete). A rowid reused later in the batch stays written.
        ids = json.dumps(sorted({r for r, _ in written}))
        present = {int(r[0]) for r in db.execute(
            f"SELECT rowid FROM {coll._schema.table} WHERE rowid IN (SELECT value FROM json_each(?))", (ids,))}
        removed = removed + [r for r, _ in written if r not in present]
        written = [(r, b) for r, b in written if r in present]
    rowids = [r for r, _ in written]
    if removed:
        derived.delete(db, removed)
    if written:
        # Every written row may have had index entries: treat all as replaced (old_max beyond any rowid).
        # Rows above a vec0 index's high-water rowid are left to its next catch-up (vectors.py).
        derived.write(db, rowids, [b for _, b in written], old_max=NO_HIGH_WATER)
    fpos = coll._filter_positions
    for name, pos in coll._vector_positions.items():
        changes: list[tuple[int, Any, Any]] = [(r, None, None) for r in removed]
        changes += [(r, b[pos], tuple(b[p] for p in fpos)) for r, b in written]
        store._vectors.note(coll.name, name, changes)


def origin(store: Store, collection: str, key: Any) -> str | None:
    """The id of the store that wrote this row if it was pulled from another store; None if local or missing."""
    coll = store.collection(collection)
    sch = coll._schema
    checked = coll._check_key(key)

    def read(db: Any) -> str | None:
        if db.execute("SELECT 1 FROM sqlite_schema WHERE name = '_ls_origin'").fetchone() is None:
            return None
        row = db.execute(
            f"SELECT o.store_id FROM {sch.table} t JOIN _ls_origin o ON o.coll = ? AND o.key = t.{quote(sch.key)} "
            f"WHERE t.{quote(sch.key)} = ? AND o.hlc = t._ls_hlc",
            (sch.id, checked),
        ).fetchone()
        return None if row is None else str(row[0])

    return store._run(read, f"reading the origin of a row of {collection!r}")  # type: ignore[no-any-return]


__all__ = [
    "PULLED_SEQ",
    "RemoteRow",
    "apply_remote",
    "collection_specs",
    "create_with_id",
    "declare_from_spec",
    "fingerprint",
    "finish_restore",
    "internal_tables",
    "load_internal_tables",
    "load_restored",
    "local_dictionaries",
    "origin",
    "subscribe",
    "subscriptions",
    "unsubscribe",
]
