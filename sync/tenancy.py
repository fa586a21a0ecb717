"""Multi-tenant isolation of the central Postgres: row-level security keyed on the store id.

Several sync daemons may share one central schema without seeing each other's
stores. ``setup`` (run once, and again after an upgrade, with an admin URL) makes
the schema's tables owned by an owner role, enables and *forces* row-level
security on every one of them, and adds a group role for tenants. ``grant`` makes
a login role a tenant: not the owner, not a superuser, no ``BYPASSRLS``.

Ownership of a store is its registry row: ``stores.tenant`` is the role that
registered it first (``DEFAULT current_user``). Every other table holding store
rows (the change log, collections, dictionaries, the internal tables with the
wrapped keys, and each current-state table) admits a row only when its store id
is one of the current role's own stores, for reading and for writing alike. A
tenant therefore claims a store id by registering it, and can never register,
read or write an id another role claimed.

Tenants cannot create tables. A new collection's state table is created (or
extended with new fields) by ``ensure_state_table``, a ``SECURITY DEFINER``
function owned by the owner role that accepts only a table name of the form
``c_<collection>``, column names, and column types from a fixed list, and that
applies RLS, FORCE, the policies and the grants to the tables it creates. Its
``search_path`` is pinned; it runs no SQL it was given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import mapping
from .central import DEFAULT_SCHEMA, Central
from .errors import SyncError, TenancyError, wrap
from .url import redact, resolve_url

log = logging.getLogger("localstore.sync")

#: The ``meta`` key whose presence turns tenancy mode on; its value is the tenants' group role.
META_TENANCY = "tenancy"

#: The ``meta`` key naming the role that owns the central tables (and the definer function).
META_OWNER = "tenancy_owner"

#: The registry column holding the role that claimed a store.
TENANT_COLUMN = "tenant"

#: The definer function that creates or extends a current-state table for tenants.
FUNCTION = "ls_ensure_state_table"

#: Tables whose rows belong to a store through their ``store_id`` column.
KEYED_TABLES = ("changes", "collections", "dictionaries", "store_tables")

#: Column types the definer function accepts (``vector(N)`` is checked separately).
ALLOWED_TYPES = ("text", "bigint", "double precision", "boolean", "jsonb", "bytea", "real[]")

#: Environment variable read for the admin URL when ``--admin-url`` is not given.
ADMIN_URL_ENV = "LOCALSTORE_POSTGRES_ADMIN_URL"

#: Policy names: tenants see their own stores' rows; the owner role sees everything.
TENANT_POLICY = "ls_tenant_rows"
OWNER_POLICY = "ls_owner_all"



@dataclass
class Tenancy:
    """What ``setup`` put in place in one central schema."""

    schema: str
    group: str
    owner: str
    tables: list[str]


def default_group(schema: str) -> str:
    """The tenants' group role for a schema: ``<schema>_tenants`` (Postgres roles are cluster-wide)."""
    return f"{schema}_tenants"[:63]


def marker(conn: psycopg.Connection[Any], schema: str) -> tuple[str, str] | None:
    """(group, owner) if tenancy is set up in ``schema``, else None."""
    exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, "meta").as_string(conn),)).fetchone()
    if exists is None or exists[0] is None:
        return None
    rows = dict(conn.execute(
        sql.SQL("SELECT key, value FROM {} WHERE key IN (%s, %s)").format(sql.Identifier(schema, "meta")),
        (META_TENANCY, META_OWNER)).fetchall())
    if META_TENANCY not in rows:
        return None
    return rows[META_TENANCY], rows.get(META_OWNER, "")


# -- set-up ------------------------------------------------------------------------------------


def setup(admin_url: str | None, schema: str = DEFAULT_SCHEMA, *, group: str | None = None,
          owner: str | None = None, pgvector: bool = True) -> Tenancy:
    """Create (or bring up to date) the central schema with row-level security for tenants; idempotent.

    Runs as the admin of ``admin_url``: a superuser, or a role with ``CREATEROLE`` that
    owns the schema (or may create it). With ``owner``, that role (created ``NOLOGIN``
    if missing) owns the schema, its tables and the definer function, so the function
    never runs as a superuser; otherwise the admin's own role does.
    """
    url = _admin_url(admin_url)
    group = group or default_group(schema)
    conn = _connect(url, "connecting for tenancy setup")
    try:
        with conn.transaction():
            me = _check_admin(conn, url, schema, owner)
            _ensure_group(conn, group)
            if owner and owner != me:
                _ensure_owner_role(conn, owner)
                _transfer(conn, schema, owner)
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
            acting = owner or me
            central = Central(url, schema, pgvector=pgvector)
            central._ensure_schema(conn)
            conn.execute(sql.SQL("SET LOCAL search_path = pg_catalog, pg_temp"))
            tables = _secure(conn, schema, group, acting)
        log.info("tenancy set up", extra={"event": "tenancy_setup", "schema": schema, "group": group,
                                          "owner": acting, "url": redact(url)})
        return Tenancy(schema, group, acting, tables)
    except TenancyError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise _wrap(exc, url, f"setting up tenancy in schema {schema!r}") from None
    finally:
        conn.close()


def _check_admin(conn: psycopg.Connection[Any], url: str, schema: str, owner: str | None) -> str:
    """The admin's role name; raise ``TenancyError`` saying what is missing if it cannot set up tenancy."""
    me, superuser, createrole, can_create, schema_owner, owns = _one(conn,
        "SELECT current_user::text, r.rolsuper, r.rolcreaterole, has_database_privilege(current_database(), 'CREATE'), "
        "n.nspowner::regrole::text, pg_has_role(current_user, n.nspowner, 'USAGE') "
        "FROM pg_roles r LEFT JOIN pg_namespace n ON n.nspname = %s WHERE r.rolname = current_user",
        (schema,))
    how = (f"run it with an admin URL (--admin-url or ${ADMIN_URL_ENV}): a superuser, or a role with CREATEROLE "
           f"that owns schema {schema!r}")
    if superuser:
        return str(me)
    if not createrole:
        raise TenancyError(
            f"role {me!r} at {redact(url)} cannot set up tenancy: it cannot create roles (no CREATEROLE) "
            f"and is not a superuser; {how}")
    if schema_owner is not None and not owns:
        raise TenancyError(
            f"role {me!r} at {redact(url)} cannot set up tenancy: schema {schema!r} is owned by {schema_owner!r}; {how}")
    if schema_owner is None and not can_create:
        raise TenancyError(
            f"role {me!r} at {redact(url)} cannot create schema {schema!r} (no CREATE on the database); {how}")
    if owner and owner != me:
        raise TenancyError(f"--owner {owner!r} needs a superuser admin URL (role {me!r} is not one); "
                           "leave --owner out to make the admin's role the owner")
    return str(me)


def _ensure_owner_role(conn: psycopg.Connection[Any], owner: str) -> None:
    """Create the owner role (NOLOGIN) if missing; refuse one that is a superuser or bypasses RLS."""
    row = conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (owner,)).fetchone()
    if row is None:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(owner)))
    elif row[0] or row[1]:
        raise TenancyError(f"--owner {owner!r} is a superuser or has BYPASSRLS, so FORCE ROW LEVEL SECURITY "
                           "would not bind it; choose a plain role (it is created NOLOGIN if missing)")
    # The owner creates the schema (when missing) and the pgvector columns' type lookups.
    conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        sql.Identifier(conn.info.dbname), sql.Identifier(owner)))


def _ensure_group(conn: psycopg.Connection[Any], group: str) -> None:
    """Create the tenants' group role if missing (NOLOGIN) and let it connect and make temporary tables."""
    g = sql.Identifier(group)
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (group,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOSUPERUSER NOBYPASSRLS").format(g))
    # The shipping transaction stages each batch in temporary tables.
    conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(conn.info.dbname), g))


def _transfer(conn: psycopg.Connection[Any], schema: str, owner: str) -> None:
    """Hand an existing central schema and its tables to the owner role (run as the superuser admin)."""
    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None:
        return
    conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(owner)))
    for (table,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname", (schema,)).fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(schema, table), sql.Identifier(owner)))
    fn = conn.execute("SELECT to_regprocedure(%s)", (f"{sql.Identifier(schema, FUNCTION).as_string(conn)}(text, jsonb)",)).fetchone()
    if fn and fn[0]:
        conn.execute(sql.SQL("ALTER FUNCTION {}(text, jsonb) OWNER TO {}").format(
            sql.Identifier(schema, FUNCTION), sql.Identifier(owner)))


def _secure(conn: psycopg.Connection[Any], schema: str, group: str, owner: str) -> list[str]:
    """Owner column, group role, grants, RLS + FORCE + policies on every table, the definer function, the marker."""
    s = sql.Identifier(schema)
    g = sql.Identifier(group)
    o = sql.Identifier(owner)

    def q(name: str) -> sql.Identifier:
        return sql.Identifier(schema, name)

    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} name NOT NULL DEFAULT current_user").format(
        q("stores"), sql.Identifier(TENANT_COLUMN)))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
        sql.Identifier("stores_tenant"), q("stores"), sql.Identifier(TENANT_COLUMN)))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, g))

    secured: list[str] = []
    own_stores = sql.SQL("SELECT s.store_id FROM {} s WHERE s.{} = current_user").format(
        q("stores"), sql.Identifier(TENANT_COLUMN))

    def protect(table: str, tenant_rule: sql.Composable | None, grant: sql.Composable | None,
                command: str = "ALL") -> None:
        t = q(table)
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(t))
        conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(t))
        for name in (TENANT_POLICY, OWNER_POLICY):
            conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(name), t))
        conn.execute(sql.SQL("CREATE POLICY {} ON {} TO {} USING (true) WITH CHECK (true)").format(
            sql.Identifier(OWNER_POLICY), t, o))
        if tenant_rule is not None:
            conn.execute(sql.SQL("CREATE POLICY {} ON {} FOR {} TO {} ").format(
                sql.Identifier(TENANT_POLICY), t, sql.SQL(command), g) + tenant_rule)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}").format(t, g))
        if grant is not None:
            conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(grant, t, g))
        secured.append(table)

    # meta is shared configuration: tenants read it (schema version, vector type) and never write it.
    protect("meta", sql.SQL("USING (true)"), sql.SQL("SELECT"), command="SELECT")
    # Claims are permanent for tenants: no DELETE (an unclaimed id could be claimed by another
    # role, which would then see the old rows), and no UPDATE of store_id or tenant.
    updatable = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND attname NOT IN ('store_id', %s) ORDER BY attnum", (q("stores").as_string(conn), TENANT_COLUMN))]
    mine = sql.SQL("{} = current_user").format(sql.Identifier(TENANT_COLUMN))
    protect("stores", sql.SQL("USING ({}) WITH CHECK ({})").format(mine, mine), sql.SQL("SELECT, INSERT"))
    conn.execute(sql.SQL("GRANT UPDATE ({}) ON {} TO {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in updatable), q("stores"), g))
    keyed = sql.SQL("USING (store_id IN ({})) WITH CHECK (store_id IN ({}))").format(own_stores, own_stores)
    rw = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
    for table in KEYED_TABLES:
        protect(table, keyed, rw)
    # Partitions are reached through the change log only; direct access gets no grant and no tenant policy.
    for (part,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass ORDER BY c.relname", (q("changes").as_string(conn),)).fetchall():
        protect(part, None, None)
    state_rule = sql.SQL("USING (_ls_store IN ({})) WITH CHECK (_ls_store IN ({}))").format(own_stores, own_stores)
    for table in state_tables(conn, schema):
        protect(table, state_rule, rw)
    # Any other table (one a later migration added, or made by hand): forced RLS, the owner only.
    for (table,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relname = ANY(%s) ORDER BY 1",
            (schema, secured)).fetchall():
        log.warning("table %s.%s has no tenant policy: tenants cannot read or write it", schema, table,
                    extra={"event": "tenancy_unknown_table", "table": table})
        protect(table, None, None)
    _create_function(conn, schema, group, owner)
    conn.execute(sql.SQL("INSERT INTO {} (key, value) VALUES (%s, %s), (%s, %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value").format(q("meta")),
                 (META_TENANCY, group, META_OWNER, owner))
    return secured


def state_tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """The current-state tables of a central schema (ordinary tables with an ``_ls_store`` column)."""
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = '_ls_store' AND NOT a.attisdropped "
        "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY c.relname", (schema,)).fetchall()]


# The body of the definer function. Names are quoted with format('%I'); the only values it
# interpolates are validated names and types from a fixed list. The schema, group and owner
# are fixed at set-up time ({schema}, {group}, {owner} are SQL literals).
_FUNCTION_BODY = r"""
DECLARE
  v_schema constant text := {schema};
  v_group constant text := {group};
  v_owner constant text := {owner};
  v_rel regclass;
  v_col jsonb;
  v_name text;
  v_type text;
  v_ops text;
  v_sqltype text;
  v_vschema text;
  v_dim int;
  v_rule text;
BEGIN
  IF p_table IS NULL OR p_table !~ '^c_[a-z0-9_]+$' OR octet_length(p_table) > 63 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('%L is not a localstore state table name (c_<collection lowercased>, at most 63 bytes)',
                       p_table);
  END IF;
  IF jsonb_typeof(p_columns) IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'columns must be a JSON array';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('localstore-table:' || v_schema || '.' || p_table));
  v_rel := to_regclass(format('%I.%I', v_schema, p_table));
  IF v_rel IS NOT NULL AND NOT EXISTS (
      SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_rel AND a.attname = '_ls_store' AND NOT a.attisdropped) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('%I.%I is not a localstore state table', v_schema, p_table);
  END IF;
  IF v_rel IS NULL THEN
    EXECUTE format('CREATE TABLE %I.%I (_ls_store uuid NOT NULL, _ls_key text COLLATE "C" NOT NULL, '
                   '_ls_seq bigint NOT NULL, '
                   '_ls_hlc bigint NOT NULL, _ls_deleted boolean NOT NULL DEFAULT false, '
                   '_ls_xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint, '
                   '_ls_synced_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (_ls_store, _ls_key))',
                   v_schema, p_table);
    EXECUTE format('CREATE INDEX %I ON %I.%I USING brin (_ls_xid)', left(p_table || '_xid', 63), v_schema, p_table);
    EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', v_schema, p_table);
    EXECUTE format('ALTER TABLE %I.%I FORCE ROW LEVEL SECURITY', v_schema, p_table);
    v_rule := format('(_ls_store IN (SELECT s.store_id FROM %I.stores s WHERE s.tenant = current_user))', v_schema);
    EXECUTE format('CREATE POLICY ls_tenant_rows ON %I.%I TO %I USING %s WITH CHECK %s',
                   v_schema, p_table, v_group, v_rule, v_rule);
    EXECUTE format('CREATE POLICY ls_owner_all ON %I.%I TO %I USING (true) WITH CHECK (true)',
                   v_schema, p_table, v_owner);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.%I TO %I', v_schema, p_table, v_group);
  END IF;
  FOR v_col IN SELECT value FROM jsonb_array_elements(p_columns) LOOP
    v_name := v_col ->> 'name';
    v_type := v_col ->> 'type';
    v_ops := v_col ->> 'hnsw';
    IF v_name IS NULL OR v_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' OR octet_length(v_name) > 63
        OR left(v_name, 4) = '_ls_' THEN
      RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = format('%L is not an allowed field column name', v_name);
    END IF;
    IF v_type = ANY (ARRAY['text', 'bigint', 'double precision', 'boolean', 'jsonb', 'bytea', 'real[]']) THEN
      v_sqltype := v_type;
    ELSIF v_type ~ '^vector\([1-9][0-9]*\)$' AND length(v_type) <= 14 THEN
      v_dim := substring(v_type FROM '[0-9]+')::int;
      SELECT n.nspname INTO v_vschema FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname = 'vector';
      IF v_vschema IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'undefined_object', MESSAGE = 'pgvector is not installed';
      END IF;
      v_sqltype := format('%I.vector(%s)', v_vschema, v_dim);
    ELSE
      RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = format('column type %L is not allowed for a state table', v_type);
    END IF;
    EXECUTE format('ALTER TABLE %I.%I ADD COLUMN IF NOT EXISTS %I %s', v_schema, p_table, v_name, v_sqltype);
    IF v_ops IS NOT NULL THEN
      IF v_vschema IS NULL OR NOT v_ops = ANY (ARRAY['vector_cosine_ops', 'vector_l2_ops', 'vector_l1_ops']) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
          MESSAGE = format('HNSW operator class %L is not allowed on %L', v_ops, v_type);
      END IF;
      EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I.%I USING hnsw (%I %I.%I)',
                     left(p_table || '_' || v_name || '_hnsw', 63), v_schema, p_table, v_name, v_vschema, v_ops);
    END IF;
  END LOOP;
END
"""


def _create_function(conn: psycopg.Connection[Any], schema: str, group: str, owner: str) -> None:
    body = sql.SQL(_FUNCTION_BODY.replace("{", "{{").replace("}", "}}")
                   .replace("{{schema}}", "{schema}").replace("{{group}}", "{group}")
                   .replace("{{owner}}", "{owner}")).format(
        schema=sql.Literal(schema), group=sql.Literal(group), owner=sql.Literal(owner)).as_string(conn)
    fn = sql.Identifier(schema, FUNCTION)
    # SECURITY DEFINER with a pinned search_path: every name inside is schema-qualified or in pg_catalog.
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {}(p_table text, p_columns jsonb) RETURNS void LANGUAGE plpgsql "
        "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}").format(fn, sql.Literal(body)))
    conn.execute(sql.SQL("ALTER FUNCTION {}(text, jsonb) OWNER TO {}").format(fn, sql.Identifier(owner)))
    conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}(text, jsonb) FROM PUBLIC").format(fn))
    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}(text, jsonb) TO {}").format(fn, sql.Identifier(group)))


# -- the hook central uses ------------------------------------------------------------------------


def ensure_state_table(conn: psycopg.Connection[Any], schema: str, table: str, spec: dict[str, Any],
                       wanted: dict[str, str], hnsw: bool) -> None:
    """Create or extend a state table through the definer function (tenancy mode's ``Central._extend``)."""
    columns = []
    for fname, pgtype in wanted.items():
        fspec = spec["fields"][fname]
        ops = None
        if (hnsw and pgtype.startswith("vector(") and int(fspec["dim"]) <= mapping.HNSW_MAX_DIM
                and fspec.get("metric", "cosine") in mapping.HNSW_OPS):
            ops = mapping.HNSW_OPS[fspec.get("metric", "cosine")]
        columns.append({"name": fname, "type": pgtype, "hnsw": ops})
    conn.execute(sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(schema, FUNCTION)), (table, Jsonb(columns)))


def refused(exc: SyncError, schema: str, name: str, store_id: str) -> SyncError:
    """A row-level security refusal while registering or shipping a store, said as what it means."""
    if not isinstance(exc.__context__, psycopg.errors.InsufficientPrivilege) or "row-level security" not in str(exc):
        return exc
    return TenancyError(
        f"store {name} (id {store_id}) is claimed by another tenant role in schema {schema!r}: row-level security "
        "lets a role register and write only store ids it claimed first. If this file is a copy of another "
        "daemon's store, sync it with that daemon's role; to move the store, the admin runs "
        f"UPDATE {schema}.stores SET tenant = 'ROLE' WHERE store_id = '{store_id}'")


def check_can_migrate(conn: psycopg.Connection[Any], schema: str, shown: str, version: int, target: int) -> None:
    """Refuse, clearly, a tenant connection that finds the schema older than this code: only the admin migrates."""
    owner = conn.execute(
        "SELECT rolsuper OR pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c, pg_roles r "
        "WHERE c.oid = %s::regclass AND r.rolname = current_user", (sql.Identifier(schema, "meta").as_string(conn),)
    ).fetchone()
    if not (owner and owner[0]):
        from .errors import CentralSchemaError

        raise CentralSchemaError(
            f"the central schema {schema!r} at {shown} is version {version} and this localstore needs {target}; "
            "a tenant role cannot migrate it: the admin runs `localstore sync tenancy setup` (which migrates and "
            "re-applies row-level security) with the admin URL")


# -- tenants ---------------------------------------------------------------------------------------


def grant(admin_url: str | None, role: str, schema: str = DEFAULT_SCHEMA, *, password: str | None = None) -> bool:
    """Make ``role`` a tenant of ``schema``: created (LOGIN) if missing, then added to the tenants' group.

    Returns whether the role was created. A role that is a superuser, has
    ``BYPASSRLS``, or owns the central tables is refused: RLS would not bind it.
    The password (optional) is hashed (SCRAM-SHA-256) here, so the server never sees it.
    """
    url = _admin_url(admin_url)
    conn = _connect(url, "connecting to grant a tenant role")
    try:
        with conn.transaction():
            _check_role_admin(conn, url)
            found = marker(conn, schema)
            if found is None:
                raise TenancyError(f"tenancy is not set up in schema {schema!r} at {redact(url)}; run "
                                   f"`localstore sync tenancy setup --schema {schema}` with the admin URL first")
            group, owner = found
            r = sql.Identifier(role)
            row = conn.execute("SELECT rolsuper, rolbypassrls, pg_has_role(oid, %s::text, 'USAGE') FROM pg_roles "
                               "WHERE rolname = %s", (owner, role)).fetchone()
            if row is None:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS INHERIT")
                             .format(r))
                created = True
            elif row[0] or row[1]:
                raise TenancyError(f"role {role!r} is a superuser or has BYPASSRLS: row-level security would not "
                                   "bind it; grant a plain role instead")
            elif row[2]:
                raise TenancyError(f"role {role!r} is (or is a member of) the owner {owner!r} of the central tables: "
                                   "FORCE ROW LEVEL SECURITY lets the owner's policy see every row; grant another role")
            else:
                created = False
            if password is not None:
                verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(r, sql.Literal(verifier.decode())))
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), r))
        return created
    except TenancyError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise _wrap(exc, url, f"granting tenant role {role!r}", password) from None
    finally:
        conn.close()


def revoke(admin_url: str | None, role: str, schema: str = DEFAULT_SCHEMA) -> None:
    """Remove ``role`` from the tenants' group of ``schema``; its stores stay claimed by it (unreadable to others)."""
    url = _admin_url(admin_url)
    conn = _connect(url, "connecting to revoke a tenant role")
    try:
        with conn.transaction():
            _check_role_admin(conn, url)
            found = marker(conn, schema)
            if found is None:
                raise TenancyError(f"tenancy is not set up in schema {schema!r} at {redact(url)}")
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(found[0]), sql.Identifier(role)))
    except TenancyError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise _wrap(exc, url, f"revoking tenant role {role!r}") from None
    finally:
        conn.close()


def tenants(admin_url: str | None, schema: str = DEFAULT_SCHEMA) -> list[tuple[str, int]]:
    """Each role holding stores in ``schema`` and how many (as the admin sees them)."""
    url = _admin_url(admin_url)
    conn = _connect(url, "connecting to list tenants")
    try:
        if marker(conn, schema) is None:
            raise TenancyError(f"tenancy is not set up in schema {schema!r} at {redact(url)}")
        return [(str(t), int(n)) for t, n in conn.execute(sql.SQL(
            "SELECT {}::text, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(
                sql.Identifier(TENANT_COLUMN), sql.Identifier(schema, "stores"))).fetchall()]
    except TenancyError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise _wrap(exc, url, "listing tenants") from None
    finally:
        conn.close()


def _check_role_admin(conn: psycopg.Connection[Any], url: str) -> None:
    me, superuser, createrole = _one(conn,
        "SELECT rolname::text, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
    if not (superuser or createrole):
        raise TenancyError(f"role {me!r} at {redact(url)} cannot manage tenant roles (no CREATEROLE, not a "
                           f"superuser); use the admin URL (--admin-url or ${ADMIN_URL_ENV})")


# -- plumbing --------------------------------------------------------------------------------------


def _admin_url(url: str | None) -> str:
    from .errors import ConfigError

    given = url or os.environ.get(ADMIN_URL_ENV)
    if not given:
        raise ConfigError(f"no admin URL: pass --admin-url postgresql://ADMIN:PASSWORD@HOST/DB or set {ADMIN_URL_ENV}")
    return resolve_url(given)


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The one row a catalog query returns (the current role always exists)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return tuple(row)


def _connect(url: str, action: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="localstore-tenancy")
    except (psycopg.Error, OSError) as exc:
        raise wrap(exc, url, action) from None


def _wrap(exc: BaseException, url: str, action: str, secret: str | None = None) -> SyncError:
    """``wrap``, plus: a permission error says the URL is not an admin's; ``secret`` is redacted too."""
    err = wrap(exc, url, action)
    if secret and secret in str(err):
        err = type(err)(str(err).replace(secret, "***"))
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return TenancyError(f"{err}; tenancy commands need the admin URL (the schema owner or a superuser)")
    return err
