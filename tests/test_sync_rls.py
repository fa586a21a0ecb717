"""Central multi-tenant isolation: row-level security keyed on the store id, against a real Postgres.

Two tenant roles, A and B, each sync their own workspace through the normal engine,
logged in as non-owner, non-superuser roles. Then A tries to read, insert, update and
delete B's rows in every central table, to claim B's store id, to bypass RLS; each
attempt must fail or touch nothing, while A's own sync, restore and pull keep working.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from _sync_workers import assert_converged
from localstore.sync import CentralSchemaError, SyncEngine, SyncError, restore, subscribe, tenancy
from localstore.sync.tenancy import TenancyError
from pg_fixture import PgServer
from psycopg import sql

import localstore as ls

#: Distinctive passwords: any appearance in output is a leak.
PASSWORD_A = "Tenant-A-pw-9Qx3"
PASSWORD_B = "Tenant-B-pw-4Kd8"


@dataclass
class Tenants:
    """A central schema set up for tenancy, with an owner role and two tenant login roles."""

    schema: str
    group: str
    owner: str
    a: str
    b: str
    url_a: str
    url_b: str
    admin_url: str


def _url_for(base: str, role: str, password: str) -> str:
    """``base`` (a postgresql:// URL) logged in as ``role`` with ``password``."""
    parts = urlsplit(base)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


def _admin(server: PgServer) -> psycopg.Connection[Any]:
    return psycopg.connect(server.admin_url, autocommit=True)


def _need_superuser(server: PgServer) -> None:
    """Skip when the server's admin URL cannot create roles and owners (an external server's plain role)."""
    with _admin(server) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (row and row[0]):
        pytest.skip("the tenancy tests create and drop roles: they need a superuser admin URL")


@pytest.fixture
def tenants(pg_server: PgServer, pg_schema: str) -> Iterator[Tenants]:
    """Tenancy set up in this test's schema, with unique role names, all dropped afterwards."""
    _need_superuser(pg_server)
    tag = uuid.uuid4().hex[:8]
    owner, a, b = f"ls_owner_{tag}", f"ls_ta_{tag}", f"ls_tb_{tag}"
    group = tenancy.default_group(pg_schema)
    hba = None
    if pg_server.embedded is not None:
        # Tenants log in with real SCRAM passwords (the embedded server trusts local roles by default).
        hba = Path(pg_server.embedded.pgdata) / "pg_hba.conf"
        original = hba.read_text()
        hba.write_text(f"local all +{group} scram-sha-256\n" + original)
    try:
        info = tenancy.setup(pg_server.admin_url, pg_schema, owner=owner)
        assert info.owner == owner and info.group == group
        assert tenancy.grant(pg_server.admin_url, a, pg_schema, password=PASSWORD_A)
        assert tenancy.grant(pg_server.admin_url, b, pg_schema, password=PASSWORD_B)
        with _admin(pg_server) as conn:
            conn.execute("SELECT pg_reload_conf()")
        yield Tenants(pg_schema, group, owner, a, b, _url_for(pg_server.url, a, PASSWORD_A),
                      _url_for(pg_server.url, b, PASSWORD_B), pg_server.admin_url)
    finally:
        if hba is not None:
            hba.write_text(original)
        with _admin(pg_server) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(pg_schema)))
            for role in (a, b, group, owner):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


FIELDS = {
    "id": ls.Text(),
    "phi": ls.Real(filter=True),
    "basin": ls.Vector(8),
    "notes": ls.Text(compress=True),
    "meta": ls.Json(),
    "secret": ls.Text(encrypt=True),
}


def _workspace(root: Path, name: str, seed: int) -> tuple[ls.Workspace, ls.Store]:
    """A workspace with one store holding kernels (vectors, compressed text), facts, and a trained dictionary."""
    ws = ls.Workspace(root / name, key=ls.generate_key())  # wrapped keys reach store_tables
    store = ws.open(f"agent-{name}")
    rng = np.random.default_rng(seed)
    kernels = store.collection("kernels", key="id", fields=FIELDS)
    kernels.put_many([{"id": f"k{i}", "phi": float(rng.random()), "basin": rng.random(8),
                       "notes": f"kernel {i} of {name} " * 20, "meta": {"i": i}, "secret": f"s{i}"}
                      for i in range(120)])
    kernels.delete("k3")
    store.collection("facts", key="fid", fields={"fid": ls.Text(), "text": ls.Text()}).put_many(
        [{"fid": f"f{i}", "text": f"fact {i} from {name}"} for i in range(10)])
    return ws, store


def _sync(ws: ls.Workspace, url: str, schema: str) -> int:
    engine = SyncEngine(ws, url, schema=schema, watch=False, workers=1)
    try:
        return engine.sync_now()
    finally:
        engine.close()


def _tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1", (schema,)).fetchall()]


def _key_column(conn: psycopg.Connection[Any], schema: str, table: str) -> str | None:
    cols = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (sql.Identifier(schema, table).as_string(conn),)).fetchall()]
    return "store_id" if "store_id" in cols else "_ls_store" if "_ls_store" in cols else None


def test_two_tenants_are_isolated_in_every_central_table(tmp_path: Path, tenants: Tenants) -> None:
    t = tenants
    ws_a, store_a = _workspace(tmp_path, "a", 1)
    ws_b, store_b = _workspace(tmp_path, "b", 2)
    assert _sync(ws_a, t.url_a, t.schema) == store_a.changelog.last_seq()
    assert _sync(ws_b, t.url_b, t.schema) == store_b.changelog.last_seq()
    assert_converged(t.url_a, t.schema, store_a)  # each tenant reads back all of its own rows
    assert_converged(t.url_b, t.schema, store_b)
    a_id, b_id = store_a.id, store_b.id

    with _admin_conn(t) as admin:
        # A dictionary row for each store (training one needs ~400 KB of samples; the table's rules are the point).
        for sid in (a_id, b_id):
            admin.execute(sql.SQL("INSERT INTO {} (store_id, dict_id, collection, field, data) "
                                  "VALUES (%s, 424242, 'kernels', 'notes', '\\x01')").format(
                sql.Identifier(t.schema, "dictionaries")), (sid,))
        tables = _tables(admin, t.schema)
        # Every table, including the state tables created on the fly by the tenants, is owned by
        # the owner role, with row-level security enabled and forced.
        flags = admin.execute(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
            "AND c.relkind IN ('r', 'p')", (t.schema,)).fetchall()
        assert {r[0] for r in flags} == set(tables)
        assert all(r[1] and r[2] and r[3] == t.owner for r in flags), [r for r in flags if not (r[1] and r[2])]
        assert {"c_kernels", "c_facts", "stores", "changes", "dictionaries", "store_tables", "collections"} <= set(tables)
        # The admin sees both stores' rows everywhere; each tenant's are tagged with its role.
        claims = dict(admin.execute(sql.SQL("SELECT store_id::text, tenant::text FROM {}").format(
            sql.Identifier(t.schema, "stores"))).fetchall())
        assert claims == {a_id: t.a, b_id: t.b}
        keyed = {}
        for table in tables:
            col = _key_column(admin, t.schema, table)
            if col is None:
                continue
            keyed[table] = col
            n_b = admin.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}::text = %s").format(
                sql.Identifier(t.schema, table), sql.Identifier(col)), (b_id,)).fetchone()[0]
            if not re.fullmatch(r"changes_p\d+", table):
                assert n_b > 0, f"B has no rows in {table}: the test would prove nothing"

    with psycopg.connect(t.url_a, autocommit=True) as conn:
        me = conn.execute("SELECT current_user::text, rolsuper, rolbypassrls FROM pg_roles "
                          "WHERE rolname = current_user").fetchone()
        assert me == (t.a, False, False)  # not a superuser, no BYPASSRLS
        owns = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = %s AND pg_has_role(current_user, c.relowner, 'USAGE')",
                            (t.schema,)).fetchone()[0]
        assert owns == 0  # owns no table
        assert not conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (t.owner,)).fetchone()[0]

        for table, col in keyed.items():
            tid = sql.Identifier(t.schema, table)
            key = sql.Identifier(col)
            partition = bool(re.fullmatch(r"changes_p\d+", table))
            if partition:
                # Partitions are reached only through the change log: no privilege at all.
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tid))
                continue
            # SELECT: B's rows are invisible, A's are there.
            seen = dict(conn.execute(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1").format(key, tid)).fetchall())
            assert b_id not in seen, table
            assert seen.get(a_id, 0) > 0, table
            # UPDATE and DELETE of B's rows touch nothing (or are not granted at all).
            if table == "stores":
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql.SQL("DELETE FROM {} WHERE store_id = %s").format(tid), (b_id,))
                assert conn.execute(sql.SQL("UPDATE {} SET name = 'stolen' WHERE store_id = %s").format(tid),
                                    (b_id,)).rowcount == 0
                with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no moving a claim elsewhere
                    conn.execute(sql.SQL("UPDATE {} SET tenant = %s WHERE store_id = %s").format(tid), (t.b, a_id))
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql.SQL("UPDATE {} SET store_id = %s WHERE store_id = %s").format(tid),
                                 (str(uuid.uuid4()), a_id))
            else:
                first = _first_column(conn, t.schema, table, col)
                assert conn.execute(sql.SQL("UPDATE {} SET {} = {} WHERE {} = %s").format(
                    tid, sql.Identifier(first), sql.Identifier(first), key), (b_id,)).rowcount == 0, table
                assert conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(tid, key), (b_id,)).rowcount == 0
                # Moving one of A's rows to B's store id is refused by the policy's WITH CHECK.
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                    conn.execute(sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(tid, key, key), (b_id, a_id))
            # INSERT a row under B's store id: refused by the policy.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                _insert_as(conn, t.schema, table, col, b_id, t.b)
            # Bypasses: no disabling RLS, no altering or dropping the tables.
            for stmt in ("ALTER TABLE {} DISABLE ROW LEVEL SECURITY", "ALTER TABLE {} NO FORCE ROW LEVEL SECURITY",
                         "ALTER TABLE {} ADD COLUMN evil int", "DROP TABLE {}", "DROP POLICY ls_tenant_rows ON {}"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="owner"):
                    conn.execute(sql.SQL(stmt).format(tid))
            # TRUNCATE ignores row-level security, and a trigger would run as its creator: neither is granted.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("TRUNCATE {}").format(tid))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("CREATE TRIGGER evil BEFORE INSERT ON {} FOR EACH ROW "
                                     "EXECUTE FUNCTION suppress_redundant_updates_trigger()").format(tid))
            # COPY out goes through the policies too.
            with conn.cursor() as cur, cur.copy(sql.SQL("COPY (SELECT * FROM {}) TO STDOUT").format(tid)) as cp:
                dumped = b"".join(bytes(chunk) for chunk in cp)
            assert b_id.encode() not in dumped and a_id.encode() in dumped, table
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET row_security = off; " + sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(t.schema, "stores")).as_string(conn))
        conn.execute("RESET row_security")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no tables of its own in the schema
            conn.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(t.schema, "mine")))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # shared configuration is read-only
            conn.execute(sql.SQL("UPDATE {} SET value = value").format(sql.Identifier(t.schema, "meta")))
        # The definer function takes names and types from a fixed list, never SQL.
        fn = sql.Identifier(t.schema, tenancy.FUNCTION)
        for table, cols in (("stores", []), ("c_x; DROP TABLE x", []), ("changes", []), ("C_Upper", []),
                            ("c_kernels", [{"name": "x", "type": "int); DROP TABLE stores; --"}]),
                            ("c_kernels", [{"name": "_ls_store", "type": "text"}]),
                            ("c_kernels", [{"name": "v", "type": "vector(8)", "hnsw": "x_ops; DROP"}])):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute(sql.SQL("SELECT {}(%s, %s)").format(fn), (table, psycopg.types.json.Jsonb(cols)))
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t.schema, "stores"))).fetchone()[0] == 1

    # B's rows are all still there, unchanged in number, and B still reads them.
    assert_converged(t.url_b, t.schema, store_b)

    # A cannot claim B's store id: a file carrying B's id, synced by A, is refused.
    stolen = ls.replica.create_with_id(str(tmp_path / "a" / "thief.db"), b_id)  # type: ignore[attr-defined]
    stolen.collection("facts", key="fid", fields={"fid": ls.Text(), "text": ls.Text()}).put({"fid": "x", "text": "x"})
    stolen.close()
    with pytest.raises(SyncError) as err:
        _sync(ws_a, t.url_a, t.schema)
    assert isinstance(err.value, TenancyError) and "is claimed by another tenant role" in str(err.value)
    assert PASSWORD_A not in str(err.value)
    (tmp_path / "a" / "thief.db").unlink()
    with _admin_conn(t) as admin:
        owner = admin.execute(sql.SQL("SELECT tenant::text, name FROM {} WHERE store_id = %s").format(
            sql.Identifier(t.schema, "stores")), (b_id,)).fetchone()
        assert owner == (t.b, store_b.name)
    for ws in (ws_a, ws_b):
        ws.close()


def _first_column(conn: psycopg.Connection[Any], schema: str, table: str, key: str) -> str:
    return str(conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND attname <> %s ORDER BY attnum LIMIT 1", (sql.Identifier(schema, table).as_string(conn), key)).fetchone()[0])


def _insert_as(conn: psycopg.Connection[Any], schema: str, table: str, col: str, store_id: str, tenant: str) -> None:
    """Insert a minimal row of ``table`` for ``store_id``."""
    rows = {
        "stores": ("INSERT INTO {} (store_id, name, tenant) VALUES (%s, 'x', %s)", (store_id, tenant)),
        "changes": ("INSERT INTO {} (store_id, seq, hlc, collection, key, op) VALUES (%s, 999999, 1, 'x', 'x', 'put')",
                    (store_id,)),
        "collections": (("INSERT INTO {} (store_id, name, key_field, fields, sync, state_table) "
                         "VALUES (%s, 'zz', 'k', '{{}}', true, 'c_zz')"), (store_id,)),
        "dictionaries": ("INSERT INTO {} (store_id, dict_id, data) VALUES (%s, 999999, '\\x00')", (store_id,)),
        "store_tables": ("INSERT INTO {} (store_id, name, columns, rows, digest) VALUES (%s, 'zz', '[]', '\\x00', 'd')",
                         (store_id,)),
    }
    stmt, params = rows.get(table, ("INSERT INTO {} (_ls_store, _ls_key, _ls_seq, _ls_hlc) VALUES (%s, 'zz', 1, 1)",
                                    (store_id,)))
    conn.execute(sql.SQL(stmt).format(sql.Identifier(schema, table)), params)


def _admin_conn(t: Tenants) -> psycopg.Connection[Any]:
    return psycopg.connect(t.admin_url, autocommit=True)


def test_each_tenant_still_syncs_restores_and_pulls_its_own(tmp_path: Path, tenants: Tenants) -> None:
    t = tenants
    ws_a, store_a = _workspace(tmp_path, "a", 3)
    ws_b, store_b = _workspace(tmp_path, "b", 4)
    a2 = ws_a.open("agent-a2")  # A's second store subscribes to A's facts
    a2.collection("facts", key="fid", fields={"fid": ls.Text(), "text": ls.Text()}).put({"fid": "own", "text": "a2"})
    subscribe(a2, "facts")
    _sync(ws_b, t.url_b, t.schema)
    _sync(ws_a, t.url_a, t.schema)
    _sync(ws_a, t.url_a, t.schema)  # the pull of A's facts into agent-a2
    facts = {r["fid"]: r["text"] for r in a2.collection("facts").find()}
    assert facts["f1"] == "fact 1 from a"  # pulled from A's own store
    assert not any("from b" in v for v in facts.values())  # B's facts are not visible to A's pull
    # Setup is idempotent: run again over existing state tables (as after an upgrade), nothing breaks.
    again = tenancy.setup(t.admin_url, t.schema, owner=t.owner)
    assert {"c_kernels", "c_facts", "stores", "changes"} <= set(again.tables)
    # More writes, and a new collection: a new state table through the definer function.
    store_a.collection("later", key="k", fields={"k": ls.Integer(), "v": ls.Json()}).put({"k": 1, "v": [1]})
    store_a.collection("facts").put({"fid": "f99", "text": "late"})
    assert _sync(ws_a, t.url_a, t.schema) > 0
    assert_converged(t.url_a, t.schema, store_a)
    # B declares the same collection with one more field: the definer function extends the shared table.
    store_b.collection("later", key="k", fields={"k": ls.Integer(), "v": ls.Json(), "extra": ls.Text()}).put(
        {"k": 1, "v": [2], "extra": "b only"})
    assert _sync(ws_b, t.url_b, t.schema) > 0
    assert_converged(t.url_b, t.schema, store_b)
    with psycopg.connect(t.url_a) as conn:  # A sees the new column, but not B's row in it
        assert conn.execute(sql.SQL("SELECT count(*), count(extra) FROM {}").format(
            sql.Identifier(t.schema, "c_later"))).fetchone() == (1, 0)
    # Restore as the tenant: its own store comes back; B's store is unknown to it.
    back = restore(t.url_a, store_a.name, tmp_path / "restored-a.db", schema=t.schema)
    try:
        assert back.id == store_a.id
        assert back.collection("kernels").count() == store_a.collection("kernels").count()
        assert back.collection("later").get(1)["v"] == [1]
        assert back.verify().ok
    finally:
        back.close()
    with pytest.raises(SyncError, match="no store named") as err:
        restore(t.url_a, store_b.name, tmp_path / "stolen-b.db", schema=t.schema)
    assert store_b.name not in str(err.value).split("known:")[-1]  # the list of known stores is A's only
    assert not (tmp_path / "stolen-b.db").exists()
    # A schema older than the code: a tenant cannot migrate it, and says who can.
    with _admin_conn(t) as admin:
        admin.execute(sql.SQL("UPDATE {} SET value = '0' WHERE key = 'schema_version'").format(
            sql.Identifier(t.schema, "meta")))
    with pytest.raises(CentralSchemaError, match="tenant role cannot migrate") as err:
        _sync(ws_a, t.url_a, t.schema)
    assert PASSWORD_A not in str(err.value)
    for ws in (ws_a, ws_b):
        ws.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localstore", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_cli_setup_grant_and_bad_input(tmp_path: Path, pg_server: PgServer, pg_schema: str,
                                       subprocess_env: dict[str, str]) -> None:
    _need_superuser(pg_server)
    tag = uuid.uuid4().hex[:8]
    role, other = f"ls_tc_{tag}", f"ls_td_{tag}"
    group = tenancy.default_group(pg_schema)
    env = dict(subprocess_env, TENANT_PW=PASSWORD_A)
    env.pop("LOCALSTORE_POSTGRES_ADMIN_URL", None)
    try:
        # Setup with a tenant's (non-admin) URL, before anything exists: a clear message, no password.
        with _admin(pg_server) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(other),
                                                                           sql.Literal(PASSWORD_B)))
        bad = _url_for(pg_server.url, other, PASSWORD_B)
        r = _cli("sync", "tenancy", "setup", "--admin-url", bad, "--schema", pg_schema, env=env)
        assert r.returncode == 1
        assert "cannot set up tenancy" in r.stderr and "admin URL" in r.stderr, r.stderr
        assert PASSWORD_B not in r.stdout + r.stderr and "***" in r.stderr
        # No admin URL at all.
        r = _cli("sync", "tenancy", "setup", "--schema", pg_schema, env=env)
        assert r.returncode == 1 and "no admin URL" in r.stderr
        # Setup and grant with the admin URL; the password comes from the environment, never argv.
        r = _cli("sync", "tenancy", "setup", "--admin-url", pg_server.admin_url, "--schema", pg_schema, env=env)
        assert r.returncode == 0, r.stderr
        assert "row-level security" in r.stdout and group in r.stdout
        r = _cli("sync", "tenancy", "grant", role, "--admin-url", pg_server.admin_url, "--schema", pg_schema,
                 "--password-env", "TENANT_PW", env=env)
        assert r.returncode == 0, r.stderr
        assert PASSWORD_A not in r.stdout + r.stderr
        # Setup again with the tenant's URL now that the schema exists: refused, clearly.
        tenant_url = _url_for(pg_server.url, role, PASSWORD_A)
        r = _cli("sync", "tenancy", "setup", "--admin-url", tenant_url, "--schema", pg_schema, env=env)
        assert r.returncode == 1 and "cannot set up tenancy" in r.stderr
        assert PASSWORD_A not in r.stdout + r.stderr
        # Granting as a tenant: refused.
        r = _cli("sync", "tenancy", "grant", other, "--admin-url", tenant_url, "--schema", pg_schema, env=env)
        assert r.returncode == 1 and "cannot manage tenant roles" in r.stderr
        assert PASSWORD_A not in r.stdout + r.stderr
        # A superuser cannot be made a tenant: RLS would not bind it.
        with _admin(pg_server) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} SUPERUSER").format(sql.Identifier(other)))
        r = _cli("sync", "tenancy", "grant", other, "--admin-url", pg_server.admin_url, "--schema", pg_schema, env=env)
        assert r.returncode == 1 and "superuser" in r.stderr
        # The tenant syncs through the CLI.
        ws = ls.Workspace(tmp_path / "ws")
        s = ws.open("cli-agent")
        s.collection("notes", key="k", fields={"k": ls.Text(), "v": ls.Text()}).put({"k": "1", "v": "x"})
        s.close()
        r = _cli("sync", "once", str(tmp_path / "ws"), "--url", tenant_url, "--schema", pg_schema, env=env)
        assert r.returncode == 0, r.stderr
        assert PASSWORD_A not in r.stdout + r.stderr
        r = _cli("sync", "status", str(tmp_path / "ws"), "--url", tenant_url, "--schema", pg_schema, "--json", env=env)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["postgres_error"] is None and status["stores"][0]["central_seq"] == 1
        assert PASSWORD_A not in r.stdout + r.stderr
        # The kit views are the admin's to create; a tenant is told so.
        r = _cli("sync", "views", "--url", tenant_url, "--schema", pg_schema, "--views-schema", f"v_{tag}", env=env)
        assert r.returncode == 1 and "the admin creates" in r.stderr
        assert PASSWORD_A not in r.stdout + r.stderr
        r = _cli("sync", "tenancy", "list", "--admin-url", pg_server.admin_url, "--schema", pg_schema, env=env)
        assert r.returncode == 0 and role in r.stdout
    finally:
        with _admin(pg_server) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(pg_schema)))
            for name in (role, other, group):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_views_for_the_admin_and_tenants(tmp_path: Path, tenants: Tenants) -> None:
    from localstore.sync.views import create_kit_views

    t = tenants
    views = "v_" + uuid.uuid4().hex[:8]
    for name, url, seed in (("a", t.url_a, 5), ("b", t.url_b, 6)):
        ws = ls.Workspace(tmp_path / name)
        s = ws.open(f"agent-{name}")
        s.collection("memories", key="memory_id", fields={"memory_id": ls.Text(), "content": ls.Text()}).put_many(
            [{"memory_id": f"m{i}", "content": f"memory {i} of {name}"} for i in range(5)])
        _sync(ws, url, t.schema)
        ws.close()
    try:
        # A tenant cannot create the views (they are shared objects); the message says who can.
        with pytest.raises(SyncError, match="admin"):
            create_kit_views(t.url_a, schema=t.schema, views_schema=views)
        made = create_kit_views(t.admin_url, schema=t.schema, views_schema=views)
        assert "memories" in made
        with psycopg.connect(t.admin_url) as conn:
            agents = {r[0] for r in conn.execute(sql.SQL("SELECT agent FROM {}").format(
                sql.Identifier(views, "memories"))).fetchall()}
            assert agents == {"agent-a", "agent-b"}  # the admin sees everyone
        with psycopg.connect(t.url_a) as conn:
            if conn.info.server_version >= 150000:
                agents = {r[0] for r in conn.execute(sql.SQL("SELECT agent FROM {}").format(
                    sql.Identifier(views, "memories"))).fetchall()}
                assert agents == {"agent-a"}  # security_invoker views: a tenant sees its own rows only
            else:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql.SQL("SELECT agent FROM {}").format(sql.Identifier(views, "memories")))
    finally:
        with _admin_conn(t) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(views)))


def test_definer_state_tables_match_the_engines_own(tmp_path: Path, tenants: Tenants, pg_server: PgServer) -> None:
    """A state table made by the definer function has the columns, types, collations and indexes
    of one made by the engine without tenancy, so shipping and pull behave the same."""
    t = tenants
    plain = "p_" + uuid.uuid4().hex[:10]
    ws, _store = _workspace(tmp_path, "a", 7)
    try:
        engine = SyncEngine(ws, t.url_a, schema=t.schema, watch=False, workers=1, hnsw=True)
        try:
            engine.sync_now()
        finally:
            engine.close()
        engine = SyncEngine(ws, pg_server.admin_url, schema=plain, watch=False, workers=1, hnsw=True)
        try:
            engine.sync_now()
        finally:
            engine.close()

        def shape(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[Any, ...]:
            rel = sql.Identifier(schema, table).as_string(conn)
            cols = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod), attnotnull, attcollation::regcollation::text, "
                "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
                "ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE a.attrelid = %s::regclass AND a.attnum > 0 "
                "AND NOT a.attisdropped ORDER BY attname", (rel,)).fetchall()
            idx = conn.execute(
                "SELECT replace(regexp_replace(pg_get_indexdef(indexrelid), ' ON \\S+', ''), %s, '') "
                "FROM pg_index WHERE indrelid = %s::regclass ORDER BY 1", (table, rel)).fetchall()
            return tuple(cols), tuple(r[0] for r in idx)

        with _admin_conn(t) as conn:
            for table in ("c_kernels", "c_facts"):
                assert shape(conn, t.schema, table) == shape(conn, plain, table), table
    finally:
        ws.close()
        with _admin_conn(t) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(plain)))


def test_the_definer_accepts_every_column_type_the_engine_makes() -> None:
    """A type the mapping starts to produce must be allowed by the definer function too, or tenants break."""
    from localstore.sync import mapping

    made = set(mapping.PLAIN_TYPES.values()) | {"bytea", "real[]"}
    assert made <= set(tenancy.ALLOWED_TYPES)
    for kind in tenancy.ALLOWED_TYPES:
        assert f"'{kind}'" in tenancy._FUNCTION_BODY
    assert set(mapping.HNSW_OPS.values()) <= {"vector_cosine_ops", "vector_l2_ops", "vector_l1_ops"}
