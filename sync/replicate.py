"""From Postgres back to stores: restore a whole store ("my laptop died"), and pull subscribed collections."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import msgpack
from psycopg import sql

from localstore import replica
from localstore.store import Store

from .central import Central, state_table_name
from .errors import RestoreError

log = logging.getLogger("localstore.sync")

#: Rows fetched per round trip while restoring or pulling.
DEFAULT_FETCH_ROWS = 5_000


def find_store(central: Central, name: str, host: str | None = None) -> dict[str, Any]:
    """The registry entry of the store called ``name`` (or with that id); raise ``RestoreError`` if none or several."""
    def read(c: Any) -> list[tuple[Any, ...]]:
        q = sql.SQL("SELECT store_id::text, name, host, workspace, last_seq, last_hlc, last_sync FROM {} "
                    "WHERE (name = %s OR store_id::text = %s)").format(central._q("stores"))
        params: list[Any] = [name, name]
        if host:
            q = q + sql.SQL(" AND host = %s")
            params.append(host)
        return c.execute(q, params).fetchall()  # type: ignore[no-any-return]

    rows = central.run("looking up the store", read)
    if not rows:
        known = central.run("listing stores", lambda c: [r[0] for r in c.execute(
            sql.SQL("SELECT name FROM {} ORDER BY name LIMIT 20").format(central._q("stores"))).fetchall()])
        raise RestoreError(
            f"Postgres at {central.shown} has no store named {name!r} in schema {central.schema!r} "
            f"(known: {', '.join(known) or 'none'}); give a store name or id that has synced"
        )
    if len(rows) > 1:
        listed = "; ".join(f"id {r[0]} on host {r[2]}" for r in rows)
        raise RestoreError(f"several stores are named {name!r} ({listed}); pass the store id, or --host")
    sid, sname, shost, ws, last_seq, last_hlc, last_sync = rows[0]
    return {"store_id": sid, "name": sname, "host": shost, "workspace": ws, "last_seq": int(last_seq),
            "last_hlc": int(last_hlc), "last_sync": last_sync}


def restore(url: str, name: str, to: str | os.PathLike[str], *, schema: str | None = None,
            host: str | None = None, progress: Any = None, **store_options: Any) -> Store:
    """Rebuild the store ``name`` from Postgres at path ``to``: same id, schema, rows and internal tables.

    The restored store continues its seq after the last one Postgres holds. It is
    returned open; on failure the partial file is removed.
    """
    from .central import DEFAULT_SCHEMA

    central = Central(url, schema or DEFAULT_SCHEMA)
    try:
        entry = find_store(central, name, host)
        path = os.fspath(to)
        if os.path.exists(path):
            raise RestoreError(f"{path} already exists; restore into a new path (or move the old file away)")
        sid = entry["store_id"]
        specs = central.run("reading the store's collections", lambda c: c.execute(
            sql.SQL("SELECT name, key_field, fields, sync, ttl FROM {} WHERE store_id = %s ORDER BY updated, name")
            .format(central._q("collections")), (sid,)).fetchall())
        tables = central.run("reading the store's internal tables", lambda c: c.execute(
            sql.SQL("SELECT name, ddl, columns, rows FROM {} WHERE store_id = %s ORDER BY name")
            .format(central._q("store_tables")), (sid,)).fetchall())
        store = replica.create_with_id(path, sid, **store_options)
        try:
            replica.load_internal_tables(store, [
                {"name": n, "ddl": d, "columns": cols if isinstance(cols, list) else json.loads(cols),
                 "rows": msgpack.unpackb(bytes(rows), raw=False)} for n, d, cols, rows in tables])
            for cname, key, fields, sync_flag, ttl in specs:
                fields = fields if isinstance(fields, dict) else json.loads(fields)
                replica.declare_from_spec(store, {"name": cname, "key": key, "fields": fields,
                                                  "sync": sync_flag, "ttl": ttl})
            for cname, *_ in specs:
                rows_iter = _latest_rows(central, sid, cname, entry["last_seq"])
                n = replica.load_restored(store, cname, rows_iter)
                if progress is not None:
                    progress(cname, n)
            replica.finish_restore(store, entry["last_seq"], entry["last_hlc"])
        except BaseException:
            store.close()
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.remove(path + suffix)
                except FileNotFoundError:
                    pass
            raise
        return store
    finally:
        central.close()


def _latest_rows(central: Central, store_id: str, collection: str, upto: int) -> list[tuple[dict[str, Any], int, int]]:
    """The newest put of every live key of a collection, from the change log, as (stored values, seq, hlc)."""
    def read(c: Any) -> list[tuple[dict[str, Any], int, int]]:
        out = []
        with c.cursor(name="ls_restore") as cur:
            cur.itersize = DEFAULT_FETCH_ROWS
            cur.execute(sql.SQL(
                "SELECT op, seq, hlc, payload FROM (SELECT DISTINCT ON (key) op, seq, hlc, payload FROM {} "
                "WHERE store_id = %s AND collection = %s AND seq <= %s ORDER BY key, seq DESC) last "
                "WHERE op = 'put' ORDER BY seq").format(central._q("changes")), (store_id, collection, upto))
            for op, seq, hlc, payload in cur:
                out.append((msgpack.unpackb(bytes(payload), raw=False), int(seq), int(hlc)))
        return out

    return central.run(f"reading the rows of {collection!r}", read)  # type: ignore[no-any-return]


def subscribe(store: Store, collection: str) -> None:
    """Subscribe ``store`` to ``collection`` as written by other stores; each sync pass then pulls it."""
    replica.subscribe(store, collection)


def pull_subscriptions(central: Central, store: Store, subscriptions: dict[str, str] | None = None) -> int:
    """Pull every subscribed collection of ``store``; return the rows applied."""
    total = 0
    subs = replica.subscriptions(store) if subscriptions is None else subscriptions
    for collection, cursor in subs.items():
        total += pull(central, store, collection, cursor)
    return total


def pull(central: Central, store: Store, collection: str, cursor: str | None = None) -> int:
    """Apply rows of ``collection`` written by other stores since ``cursor``; return how many were applied.

    Reads in one REPEATABLE READ transaction: the rows changed since the cursor (a
    transaction id) and the snapshot's xmin, which becomes the next cursor, so rows
    committed by transactions still running now are read next time. Re-reading a row
    is harmless: the merge is last-writer-wins.
    """
    if cursor is None:
        cursor = replica.subscriptions(store).get(collection, "0")
    if collection not in store.collections():
        spec = _origin_spec(central, collection, store.id)
        if spec is None:
            return 0
        replica.declare_from_spec(store, spec)
    coll = store.collection(collection)
    integer_key = coll.fields[coll.key].type_name == "Integer"
    table = central._q(state_table_name(collection))

    def read(c: Any) -> tuple[str, list[replica.RemoteRow]] | None:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        exists = c.execute("SELECT to_regclass(%s)", (f'"{central.schema}"."{state_table_name(collection)}"',)).fetchone()
        if exists is None or exists[0] is None:
            return None
        xmin = c.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0]
        rows = c.execute(sql.SQL(
            "SELECT t._ls_store::text, t._ls_key, t._ls_hlc, t._ls_deleted, ch.payload FROM {} t "
            "LEFT JOIN {} ch ON ch.store_id = t._ls_store AND ch.seq = t._ls_seq "
            "WHERE t._ls_xid >= %s AND t._ls_store <> %s ORDER BY t._ls_hlc").format(table, central._q("changes")),
            (int(cursor or 0), store.id)).fetchall()
        out = []
        for sid, key, hlc, deleted, payload in rows:
            values = None if deleted or payload is None else msgpack.unpackb(bytes(payload), raw=False)
            k: Any = int(key) if integer_key else key
            out.append(replica.RemoteRow(k, values, sid, int(hlc)))
        return xmin, out

    got = central.run(f"pulling {collection!r}", read)
    if got is None:
        return 0
    new_cursor, rows = got
    if not rows:
        # Nothing new: leave the store untouched (a write here would wake the watcher for nothing).
        return 0
    applied = replica.apply_remote(store, collection, rows, cursor=new_cursor)
    if applied:
        log.info("pulled rows", extra={"event": "pulled", "store": store.name, "collection": collection,
                                       "rows": applied})
    return applied


def _origin_spec(central: Central, collection: str, me: str) -> dict[str, Any] | None:
    row = central.run("reading a collection schema", lambda c: c.execute(
        sql.SQL("SELECT name, key_field, fields, sync, ttl FROM {} WHERE lower(name) = lower(%s) AND store_id <> %s "
                "ORDER BY updated DESC LIMIT 1").format(central._q("collections")), (collection, me)).fetchone())
    if row is None:
        return None
    name, key, fields, sync_flag, ttl = row
    return {"name": name, "key": key, "fields": fields if isinstance(fields, dict) else json.loads(fields),
            "sync": sync_flag, "ttl": ttl}


__all__ = ["find_store", "pull", "pull_subscriptions", "restore", "subscribe"]
