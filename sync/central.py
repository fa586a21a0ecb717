"""The central Postgres: its versioned schema, the stores registry and the state tables' plans.

Every table is keyed by store id first and the change log is partitioned by
hash(store_id), so the same schema distributes on ``store_id`` unchanged on a
distributed Postgres such as Citus. Shipping a batch (``Central.ship``) is in
``merge.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import msgpack
import psycopg
from psycopg import sql
from psycopg.adapt import PyFormat

from . import mapping
from .errors import CentralSchemaError, SyncError, wrap
from .merge import Merging
from .url import redact

log = logging.getLogger("localstore.sync")

#: The central schema version this code writes; migrations bring older ones up to it.
SCHEMA_VERSION = 1

#: The Postgres schema (namespace) holding localstore's tables.
DEFAULT_SCHEMA = "localstore"

#: Hash partitions of the change log. Fixed when the schema is created.
DEFAULT_PARTITIONS = 16

#: Seconds to wait for a connection before reporting Postgres unreachable. 0 waits forever.
DEFAULT_CONNECT_TIMEOUT_S = 5

_vector_warned = False


class _NoVector(Exception):
    """Internal: pgvector was turned off by the caller."""


def state_table_name(collection: str) -> str:
    """The current-state table of a collection: ``c_<name lowercased>``, hashed when too long for Postgres."""
    base = "c_" + collection.lower()
    if len(base) <= 63:
        return base
    digest = hashlib.sha1(collection.lower().encode()).hexdigest()[:8]
    return base[:54] + "_" + digest


@dataclass
class CollectionPlan:
    """How one store's collection maps onto its current-state table: columns written and their converters."""

    name: str
    table: str
    key: str
    fields: list[str]
    converters: list[mapping.Converter]
    column_types: list[str] = field(default_factory=list)
    #: Where each of ``fields`` sits in a row's stored values (key first, then fields in declared order).
    positions: list[int] = field(default_factory=list)
    #: How many stored values a row of this collection has; a row read with another count is decoded by name.
    width: int = 0


@dataclass
class StoreInfo:
    """What the central store knows of a local store: its id, name, and collection plans."""

    store_id: str
    name: str
    plans: dict[str, CollectionPlan] = field(default_factory=dict)
    specs_digest: str = ""
    #: ``replica.fingerprint`` of the store when it was last registered on this connection.
    fingerprint: str = ""
    #: The highest seq this connection saw Postgres commit for the store; None until read.
    position: int | None = None
    dictionaries: set[int] = field(default_factory=set)


class Central(Merging):
    """A connection to the central Postgres, with the schema created or migrated on first use.

    Not thread-safe: each engine thread owns one. ``close()`` ends the connection.
    """

    def __init__(
        self,
        url: str,
        schema: str = DEFAULT_SCHEMA,
        *,
        hnsw: bool = False,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S,
        partitions: int = DEFAULT_PARTITIONS,
        pgvector: bool = True,
    ) -> None:
        self.url = url
        self.pgvector = pgvector
        self.schema = schema
        self.hnsw = hnsw
        self.connect_timeout = connect_timeout
        self.partitions = partitions
        self._conn: psycopg.Connection[Any] | None = None
        self.have_vector = False
        #: Row-level security is set up (``localstore sync tenancy setup``): state tables go through its definer function.
        self.tenancy = False
        self._columns: dict[str, dict[str, str]] = {}  # state table -> column -> type
        self._stores: dict[str, StoreInfo] = {}
        self._staging: set[str] = set()  # temp staging tables made on this connection

    # -- connection ---------------------------------------------------------------------

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel on which shipped collections are announced."""
        return f"localstore.{self.schema}"[:63]

    @property
    def shown(self) -> str:
        """The URL with its password redacted."""
        return redact(self.url)

    def connect(self) -> psycopg.Connection[Any]:
        """The open connection, connecting (and creating or migrating the schema) if needed."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        try:
            conn = psycopg.connect(
                self.url, connect_timeout=self.connect_timeout, application_name="localstore-sync",
                autocommit=True,
            )
        except Exception as exc:  # noqa: BLE001 - the boundary: every failure to connect becomes a SyncError
            raise wrap(exc, self.url, "connecting") from None
        # COPY with set_types("bytea") would pick psycopg's pure-Python dumper (which also takes
        # dbapi ``Binary`` wrappers); payloads are plain bytes, so use the C dumper of ``bytes``.
        conn.adapters.register_dumper(bytes, conn.adapters.get_dumper(bytes, PyFormat.BINARY))
        self._conn = conn
        self._columns.clear()
        self._staging.clear()
        for info in self._stores.values():
            info.specs_digest = info.fingerprint = ""
            info.position = None
        try:
            self._ensure_schema(conn)
        except BaseException:
            self.close()
            raise
        return conn

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # a broken connection may fail to close; it is gone either way
                conn.close()

    def run(self, action: str, fn: Any) -> Any:
        """Run ``fn(conn)`` in one transaction, committing it; psycopg errors become ``SyncError``s."""
        conn = self.connect()
        try:
            with conn.transaction():
                return fn(conn)
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure rolls back and becomes a SyncError
            self._staging.clear()  # temp tables made in a rolled-back transaction are gone
            err = wrap(exc, self.url, action)
            if conn.broken or conn.closed:
                self.close()
            raise err from None

    def _q(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    # -- schema ---------------------------------------------------------------------------

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        def ensure(c: psycopg.Connection[Any]) -> None:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"localstore-schema:{self.schema}",))
            exists = c.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'", (self.schema,)
            ).fetchone()
            version = 0
            if exists:
                row = c.execute(
                    sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(self._q("meta"))
                ).fetchone()
                version = int(row[0]) if row else 0
            from . import tenancy

            self.tenancy = bool(exists) and tenancy.marker(c, self.schema) is not None
            if self.tenancy and version < SCHEMA_VERSION:
                tenancy.check_can_migrate(c, self.schema, self.shown, version, SCHEMA_VERSION)
            if version > SCHEMA_VERSION:
                raise CentralSchemaError(
                    f"the central schema {self.schema!r} at {self.shown} is version {version}, newer than this "
                    f"localstore understands ({SCHEMA_VERSION}); upgrade localstore"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](self, c)
                c.execute(
                    sql.SQL("INSERT INTO {} (key, value) VALUES ('schema_version', %s) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value").format(self._q("meta")),
                    (str(step),),
                )
            row = c.execute(sql.SQL("SELECT value FROM {} WHERE key = 'vector_type'").format(self._q("meta"))).fetchone()
            self.have_vector = bool(row and row[0] == "vector")
            if self.have_vector:
                # The extension may live in another schema; make its type resolvable.
                c.execute("SELECT set_config('search_path', current_setting('search_path') || ', public', false)")

        try:
            with conn.transaction():
                ensure(conn)
        except CentralSchemaError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure becomes a SyncError
            raise wrap(exc, self.url, f"creating the central schema {self.schema!r}") from None

    def _migrate_1(self, c: psycopg.Connection[Any]) -> None:
        global _vector_warned
        q = self._q
        c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        c.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value text NOT NULL)").format(q("meta")))
        c.execute(sql.SQL(
            "CREATE TABLE {} (store_id uuid PRIMARY KEY, name text NOT NULL, host text, workspace text, "
            "last_seq bigint NOT NULL DEFAULT 0, last_hlc bigint NOT NULL DEFAULT 0, last_sync timestamptz, "
            "registered timestamptz NOT NULL DEFAULT now())").format(q("stores")))
        c.execute(sql.SQL("CREATE INDEX ON {} (name)").format(q("stores")))
        c.execute(sql.SQL(
            "CREATE TABLE {} (store_id uuid NOT NULL, seq bigint NOT NULL, hlc bigint NOT NULL, "
            "collection text NOT NULL, key text NOT NULL, op text NOT NULL, payload bytea, "
            "shipped_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (store_id, seq)) "
            "PARTITION BY HASH (store_id)").format(q("changes")))
        for i in range(self.partitions):
            c.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, REMAINDER {})").format(
                q(f"changes_p{i}"), q("changes"), sql.Literal(self.partitions), sql.Literal(i)))
        c.execute(sql.SQL(
            "CREATE TABLE {} (store_id uuid NOT NULL, name text NOT NULL, key_field text NOT NULL, "
            "fields json NOT NULL, sync boolean NOT NULL, ttl double precision, state_table text NOT NULL, "
            "updated timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (store_id, name))").format(q("collections")))
        c.execute(sql.SQL(
            "CREATE TABLE {} (store_id uuid NOT NULL, dict_id bigint NOT NULL, collection text, field text, "
            "data bytea NOT NULL, shipped_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (store_id, dict_id))"
        ).format(q("dictionaries")))
        c.execute(sql.SQL(
            "CREATE TABLE {} (store_id uuid NOT NULL, name text NOT NULL, ddl text, columns jsonb NOT NULL, "
            "rows bytea NOT NULL, digest text NOT NULL, shipped_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (store_id, name))").format(q("store_tables")))
        vector_type = "real[]"
        try:
            if not self.pgvector:
                raise _NoVector("disabled with pgvector=False")
            with c.transaction():
                c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            vector_type = "vector"
        except (psycopg.Error, _NoVector) as exc:
            if not _vector_warned:
                _vector_warned = True
                log.warning(
                    "pgvector is not available at %s (%s): vector fields are stored as real[] "
                    "(no similarity operators or HNSW in SQL); install pgvector and recreate the schema to use them",
                    self.shown, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
        c.execute(sql.SQL("INSERT INTO {} (key, value) VALUES ('vector_type', %s), ('partitions', %s) "
                          "ON CONFLICT (key) DO UPDATE SET value = excluded.value").format(q("meta")),
                  (vector_type, str(self.partitions)))

    # -- stores and collections -------------------------------------------------------------

    def position(self, store_id: str) -> int:
        """The highest seq Postgres has committed for a store (0 if it has none)."""
        def read(c: psycopg.Connection[Any]) -> int:
            row = c.execute(sql.SQL("SELECT last_seq FROM {} WHERE store_id = %s").format(self._q("stores")),
                            (store_id,)).fetchone()
            return int(row[0]) if row else 0

        return int(self.run("reading a store's position", read))

    def known(self, store_id: str, fingerprint: str) -> StoreInfo | None:
        """The store's registration, if it was registered on this connection with this fingerprint."""
        info = self._stores.get(store_id)
        if info is not None and fingerprint and info.fingerprint == fingerprint and self._conn is not None:
            return info
        return None

    def register(self, store_id: str, name: str, workspace: str, specs: list[dict[str, Any]],
                 dictionaries: list[dict[str, Any]], tables: list[dict[str, Any]] | None = None) -> StoreInfo:
        """Record a store, its collections' schemas, dictionaries and internal tables; create or extend state tables."""
        info = self._stores.get(store_id)
        if info is None:
            info = self._stores[store_id] = StoreInfo(store_id, name)
        packed_tables = []
        for t in tables or []:
            blob = msgpack.packb([list(r) for r in t["rows"]], use_bin_type=True)
            packed_tables.append((t, blob, hashlib.sha1(blob + (t["ddl"] or "").encode()).hexdigest()))
        digest = hashlib.sha1(json.dumps(specs, sort_keys=True).encode()
                              + "".join(d for _, _, d in packed_tables).encode()).hexdigest()
        new_dicts = [d for d in dictionaries if d["dict_id"] not in info.dictionaries]
        if digest == info.specs_digest and not new_dicts:
            return info
        host = socket.gethostname()

        def reg(c: psycopg.Connection[Any]) -> None:
            c.execute(sql.SQL(
                "INSERT INTO {} AS s (store_id, name, host, workspace) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store_id) DO UPDATE SET name = excluded.name, host = excluded.host, "
                "workspace = excluded.workspace WHERE (s.name, s.host, s.workspace) IS DISTINCT FROM "
                "(excluded.name, excluded.host, excluded.workspace)").format(self._q("stores")),
                (store_id, name, host, workspace))
            # Unchanged rows are not rewritten (here and below): an engine starting over many known
            # stores only locks them, with no new row versions to write and vacuum.
            for spec in specs:
                c.execute(sql.SQL(
                    "INSERT INTO {} (store_id, name, key_field, fields, sync, ttl, state_table) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (store_id, name) DO UPDATE SET "
                    "key_field = excluded.key_field, fields = excluded.fields, sync = excluded.sync, "
                    "ttl = excluded.ttl, state_table = excluded.state_table, updated = now() "
                    "WHERE {}.fields::text IS DISTINCT FROM excluded.fields::text OR {}.ttl IS DISTINCT FROM excluded.ttl"
                ).format(self._q("collections"), self._q("collections"), self._q("collections")),
                    (store_id, spec["name"], spec["key"], json.dumps(spec["fields"]), spec["sync"], spec["ttl"],
                     state_table_name(spec["name"])))
            for t, blob, tdigest in packed_tables:
                c.execute(sql.SQL(
                    "INSERT INTO {} (store_id, name, ddl, columns, rows, digest) VALUES (%s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (store_id, name) DO UPDATE SET ddl = excluded.ddl, columns = excluded.columns, "
                    "rows = excluded.rows, digest = excluded.digest, shipped_at = now() "
                    "WHERE {}.digest <> excluded.digest").format(self._q("store_tables"), self._q("store_tables")),
                    (store_id, t["name"], t["ddl"], json.dumps(t["columns"]), blob, tdigest))
            for d in new_dicts:
                c.execute(sql.SQL(
                    "INSERT INTO {} (store_id, dict_id, collection, field, data) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (store_id, dict_id) DO NOTHING").format(self._q("dictionaries")),
                    (store_id, d["dict_id"], d.get("collection"), d.get("field"), d["data"]))

        try:
            self.run(f"registering store {name}", reg)
        except SyncError as exc:
            raise self._refused(exc, name, store_id) from None
        info.dictionaries.update(d["dict_id"] for d in new_dicts)
        info.plans = {spec["name"]: self._plan(spec) for spec in specs if spec["sync"]}
        info.specs_digest = digest
        return info

    def _plan(self, spec: dict[str, Any]) -> CollectionPlan:
        """Create or extend the collection's state table for this spec; return how to write it."""
        table = state_table_name(spec["name"])
        columns = self._state_columns(table)
        wanted = {f: mapping.pg_type(s, self.have_vector) for f, s in spec["fields"].items()}
        missing = {f: t for f, t in wanted.items() if columns is None or f not in columns}
        if columns is None or missing:
            self.run(f"creating the state table of {spec['name']!r}", lambda c: self._extend(c, table, spec, wanted))
            self._columns.pop(table, None)
            columns = self._state_columns(table)
            assert columns is not None
        order = [spec["key"]] + [f for f in spec["fields"] if f != spec["key"]]
        fields, converters, types = [], [], []
        for fname, fspec in spec["fields"].items():
            have = columns.get(fname)
            if have is None or not mapping.compatible(fspec, have, self.have_vector):
                log.warning("field %s.%s is %s in this store but %s in %s.%s; its column stays NULL for this store "
                            "(the change log keeps the value)", spec["name"], fname, wanted[fname], have,
                            self.schema, table)
                continue
            fields.append(fname)
            converters.append(mapping.converter(fspec, have))
            types.append(have)
        return CollectionPlan(spec["name"], table, spec["key"], fields, converters, types,
                              [order.index(f) for f in fields], len(order))

    def _state_columns(self, table: str) -> dict[str, str] | None:
        cached = self._columns.get(table)
        if cached is not None:
            return cached

        def read(c: psycopg.Connection[Any]) -> dict[str, str] | None:
            rows = c.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "JOIN pg_class r ON r.oid = a.attrelid JOIN pg_namespace n ON n.oid = r.relnamespace "
                "WHERE n.nspname = %s AND r.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                (self.schema, table),
            ).fetchall()
            return {name: typ for name, typ in rows} if rows else None

        found = self.run("reading a state table", read)
        if found is not None:
            self._columns[table] = found
        return found  # type: ignore[no-any-return]

    def _refused(self, exc: SyncError, name: str, store_id: str) -> SyncError:
        """``exc``, or with tenancy on and a row-level security refusal, the error naming the claimed store."""
        from .tenancy import refused

        return refused(exc, self.schema, name, store_id) if self.tenancy else exc

    def _extend(self, c: psycopg.Connection[Any], table: str, spec: dict[str, Any], wanted: dict[str, str]) -> None:
        if self.tenancy:  # tenants own no tables: the owner's definer function creates and extends them
            from .tenancy import ensure_state_table

            ensure_state_table(c, self.schema, table, spec, wanted, self.hnsw)
            return
        c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"localstore-table:{self.schema}.{table}",))
        t = self._q(table)
        c.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (_ls_store uuid NOT NULL, _ls_key text COLLATE \"C\" NOT NULL, _ls_seq bigint NOT NULL, "
            "_ls_hlc bigint NOT NULL, _ls_deleted boolean NOT NULL DEFAULT false, "
            "_ls_xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint, _ls_synced_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (_ls_store, _ls_key))").format(t))
        # BRIN: rows arrive in transaction order, so a block range index finds recent ones for pull
        # at a fraction of a btree's cost per inserted row.
        c.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (_ls_xid)").format(
            sql.Identifier(f"{table}_xid"[:63]), t))
        for fname, pgtype in wanted.items():
            c.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                t, sql.Identifier(fname), sql.SQL(pgtype)))
            fspec = spec["fields"][fname]
            if (self.hnsw and pgtype.startswith("vector(") and int(fspec["dim"]) <= mapping.HNSW_MAX_DIM
                    and fspec.get("metric", "cosine") in mapping.HNSW_OPS):
                c.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw ({} {})").format(
                    sql.Identifier(f"{table}_{fname}_hnsw"[:63]), t, sql.Identifier(fname),
                    sql.SQL(mapping.HNSW_OPS[fspec.get("metric", "cosine")])))


MIGRATIONS = {1: Central._migrate_1}
