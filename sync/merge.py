"""The one Postgres transaction that merges a batch of a store's changes: COPY to staging, then merge.

A batch is COPYed into one staging table per collection, which feeds both merges:
the change log on (store_id, seq), the current-state table last-writer-wins on
(hlc, store_id), deletes as tombstones. Sending a batch twice changes nothing.
``Central`` (``central.py``) inherits this; it owns the schema and the registry.
"""

from __future__ import annotations

import hashlib
import operator
from typing import TYPE_CHECKING, Any

import msgpack
import psycopg
from psycopg import sql

from . import mapping
from .batching import latest_flags
from .errors import CentralSchemaError, PostgresError, SyncError
from .mapping import text_value

if TYPE_CHECKING:
    from .central import CollectionPlan, StoreInfo

#: Columns every current-state table has before the collection's fields.
STATE_COLUMNS = ("_ls_store", "_ls_key", "_ls_seq", "_ls_hlc", "_ls_deleted")

#: Columns of a batch's staging table before the collection's fields: one COPY feeds both the change
#: log and the current state. ``_ls_latest`` marks the last change of each key in the batch.
STAGE_COLUMNS = (("_ls_seq", "bigint", "int8"), ("_ls_hlc", "bigint", "int8"), ("_ls_key", "text", "text"),
                 ("_ls_op", "text", "text"), ("_ls_latest", "boolean", "bool"), ("_ls_payload", "bytea", "bytea"))


class _Duplicate(SyncError):
    """Internal: a change past the registry's ``last_seq`` was already in the change log; ship it conflict-safe."""


class Merging:
    """``ship`` and its merge steps, over the connection handling and names ``Central`` provides."""

    _staging: set[str]

    def run(self, action: str, fn: Any) -> Any:
        raise NotImplementedError

    def _q(self, name: str) -> sql.Identifier:
        raise NotImplementedError

    @property
    def channel(self) -> str:
        raise NotImplementedError

    def _refused(self, exc: SyncError, name: str, store_id: str) -> SyncError:
        raise NotImplementedError

    def ship(self, info: StoreInfo, changes: list[Any]) -> None:
        """Ship one batch of a store's changes (``StoredChange``s, seq order) in one Postgres transaction.

        One COPY per collection into a staging table feeds both merges: the change
        log gets every change past the registry's ``last_seq`` (read under a row lock,
        so two shippers of one store take turns), and the current-state table the
        latest change of each key, last-writer-wins on (hlc, store_id). Sending a
        batch twice changes nothing; the (store_id, seq) primary key backs it up.
        """
        if not changes:
            return
        by_coll: dict[str, list[Any]] = {}
        for ch in changes:
            by_coll.setdefault(ch.collection, []).append(ch)
        unknown = [name for name in by_coll if name not in info.plans]
        if unknown:
            raise CentralSchemaError(
                f"store {info.name}: changes name collection(s) {', '.join(unknown)} that were not registered; "
                "the schema changed during the batch and it will be retried"
            )
        last = changes[-1]
        action = f"shipping changes of store {info.name}"
        try:
            try:
                self.run(action, lambda c: self._merge(c, info, by_coll, last, careful=False))
            except (_Duplicate, PostgresError) as exc:
                if not isinstance(exc, _Duplicate) and not isinstance(exc.__context__, psycopg.DataError):
                    raise
                # Text with NUL, which Postgres refuses, or a registry behind the change log (edited
                # by hand?): ship the batch again with every converter, conflict-safe.
                self.run(action, lambda c: self._merge(c, info, by_coll, last, careful=True))
        except SyncError as exc:
            info.position = None  # unknown: the commit may or may not have happened
            raise self._refused(exc, info.name, info.store_id) from None
        except BaseException:
            info.position = None
            raise
        info.position = max(info.position or 0, last.seq)

    def _merge(self, c: psycopg.Connection[Any], info: StoreInfo, by_coll: dict[str, list[Any]], last: Any,
               *, careful: bool) -> None:
        stores = self._q("stores")
        with c.cursor() as cur:
            row = cur.execute(sql.SQL("SELECT last_seq FROM {} WHERE store_id = %s FOR UPDATE").format(stores),
                              (info.store_id,)).fetchone()
            shipped = int(row[0]) if row else 0
            for name, chs in by_coll.items():
                fresh = [ch for ch in chs if ch.seq > shipped] if chs[0].seq <= shipped else chs
                if fresh:
                    self._ship_collection(cur, info, info.plans[name], fresh, careful)
            cur.execute(sql.SQL(
                "INSERT INTO {} (store_id, name, last_seq, last_hlc, last_sync) VALUES (%s, %s, %s, %s, now()) "
                "ON CONFLICT (store_id) DO UPDATE SET last_seq = greatest({}.last_seq, excluded.last_seq), "
                "last_hlc = greatest({}.last_hlc, excluded.last_hlc), last_sync = now()").format(
                    stores, stores, stores), (info.store_id, info.name, last.seq, last.hlc))
            # Delivered at commit: engines with subscribers to these collections pull them.
            cur.execute("SELECT pg_notify(%s, %s)", (self.channel, ",".join(sorted(by_coll))))

    def _stage(self, cur: psycopg.Cursor[Any], plan: CollectionPlan) -> tuple[sql.Identifier, list[mapping.Staging]]:
        """The staging table of a collection plan on this connection (temporary, emptied at each commit)."""
        staged = [mapping.staging(t) for t in plan.column_types]
        cols = [c for c, _, _ in STAGE_COLUMNS] + plan.fields
        name = "_ls_stage_" + hashlib.sha1(f"{plan.table}|{'|'.join(cols)}|{'|'.join(plan.column_types)}".encode()
                                           ).hexdigest()[:16]
        if name not in self._staging:
            defs = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t, _ in STAGE_COLUMNS]
            defs += [sql.SQL("{} {}").format(sql.Identifier(f), sql.SQL(st.pg_type)) for f, st in zip(plan.fields, staged)]
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                sql.Identifier(name), sql.SQL(", ").join(defs)))
            self._staging.add(name)
        return sql.Identifier(name), staged

    def _ship_collection(self, cur: psycopg.Cursor[Any], info: StoreInfo, plan: CollectionPlan, changes: list[Any],
                         careful: bool) -> None:
        """COPY one collection's part of a batch into its staging table, then merge the change log and the state."""
        stage, staged = self._stage(cur, plan)
        fields, width = plan.fields, plan.width
        nulls = (None,) * len(fields)
        # Stored values are taken by position in C; only the converters that change a value run
        # per row. Text needs none unless it holds NUL, which Postgres refuses (DataError): the
        # batch is then shipped again ``careful``, with every converter.
        pick = _picker(plan.positions)
        fixes = [(i, conv) for i, (conv, kind) in enumerate(zip(plan.converters, plan.column_types))
                 if careful or not mapping.passthrough(kind)]
        unpack = msgpack.unpackb
        with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(stage)) as cp:
            cp.set_types([t for _, _, t in STAGE_COLUMNS] + [st.copy_type for st in staged])
            write = cp.write_row
            for ch, latest in zip(changes, latest_flags([ch.key for ch in changes])):
                packed = ch.packed
                if not latest or packed is None:
                    # Superseded within the batch (or a delete): the state needs no columns, so
                    # its payload goes to the change log as stored, never decoded.
                    values: Any = nulls
                else:
                    row = ch.values
                    if row is not None and len(row) == width:
                        values = pick(row)
                    else:  # the row as it was when written: decode its stored payload
                        got = unpack(packed, raw=False)
                        values = tuple(got.get(f) for f in fields)
                    if fixes:
                        values = list(values)
                        for i, conv in fixes:
                            values[i] = conv(values[i])
                key = ch.key
                key = key if type(key) is str and not careful else text_value(str(key))
                write((ch.seq, ch.hlc, key, ch.op, latest, packed, *values))
        self._insert_changes(cur, info, plan, stage, careful)
        select = sql.SQL(", ").join(
            [sql.Identifier(f) if st.cast is None else sql.SQL("{}::{}").format(sql.Identifier(f), sql.SQL(st.cast))
             for f, st in zip(fields, staged)])
        state_cols = sql.SQL(", ").join(sql.Identifier(c) for c in [*STATE_COLUMNS, "_ls_xid", *fields])
        updates = sql.SQL(", ").join(
            sql.SQL("{} = excluded.{}").format(sql.Identifier(c), sql.Identifier(c))
            for c in ["_ls_seq", "_ls_hlc", "_ls_deleted", "_ls_xid", *fields])
        cur.execute(sql.SQL(
            "INSERT INTO {} AS t ({}) SELECT %s, _ls_key, _ls_seq, _ls_hlc, _ls_op = 'delete', "
            "(SELECT pg_current_xact_id()::text::bigint){}{} FROM {} WHERE _ls_latest "
            "ON CONFLICT (_ls_store, _ls_key) DO UPDATE SET {}, _ls_synced_at = now() "
            "WHERE (excluded._ls_hlc, excluded._ls_store) > (t._ls_hlc, t._ls_store)").format(
                self._q(plan.table), state_cols, sql.SQL(", ") if fields else sql.SQL(""), select, stage, updates),
            (info.store_id,))

    def _insert_changes(self, cur: psycopg.Cursor[Any], info: StoreInfo, plan: CollectionPlan,
                        stage: sql.Identifier, careful: bool) -> None:
        """Append the staged changes to the change log; raise ``_Duplicate`` if one is already there.

        A plain INSERT: every staged seq is past the registry's ``last_seq`` (read under
        its row lock), so none can be there unless the registry was changed by hand. It
        saves the speculative insertion that ON CONFLICT costs per row; ``careful`` adds
        ON CONFLICT DO NOTHING for the retry after a ``_Duplicate``.
        """
        query = sql.SQL("INSERT INTO {} (store_id, seq, hlc, collection, key, op, payload) "
                        "SELECT %s, _ls_seq, _ls_hlc, %s, _ls_key, _ls_op, _ls_payload FROM {}").format(
                            self._q("changes"), stage)
        if careful:
            query = query + sql.SQL(" ON CONFLICT (store_id, seq) DO NOTHING")
        try:
            cur.execute(query, (info.store_id, plan.name))
        except psycopg.errors.UniqueViolation:
            raise _Duplicate(f"store {info.name}: a change past the registry's last_seq is already in Postgres") from None


def _picker(positions: list[int]) -> Any:
    """A function from a row's stored values to the plan's field values, as a tuple (itemgetter, in C)."""
    if not positions:
        return lambda row: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda row: (row[i],)
    return operator.itemgetter(*positions)
