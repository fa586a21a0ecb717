"""Privacy across sync: subject keys never reach Postgres, so forget reaches the central copy too."""

from __future__ import annotations

from pathlib import Path

import msgpack
import psycopg
from localstore.sync import SyncEngine, restore
from psycopg import sql

import localstore as ls

CANARY = "canary-7f3a-plaintext"


def _profiles(store: ls.Store) -> ls.Collection:
    return store.collection("profiles", key="pid", fields={
        "pid": ls.Text(),
        "email": ls.Text(encrypt=True, subject="pid"),
        "bio": ls.Text(encrypt=True),
        "plain": ls.Text(),
    })


def _sync(ws: ls.Workspace, url: str, schema: str) -> None:
    engine = SyncEngine(ws, url, schema=schema, watch=False)
    try:
        engine.sync_now()
    finally:
        engine.stop()


def test_subject_keys_stay_local_and_restore_reads_them_as_forgotten(
    tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    key = ls.generate_key()
    ws = ls.Workspace(tmp_path / "ws", key=key)
    store = ws.open("agent")
    profiles = _profiles(store)
    profiles.put({"pid": "ada", "email": f"ada@{CANARY}", "bio": f"bio {CANARY}", "plain": "hello"})
    _sync(ws, pg_url, pg_schema)

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT columns, rows FROM {}.store_tables WHERE name = '_ls_keys'").format(sql.Identifier(pg_schema))
        ).fetchall()
        assert rows, "the wrapped data keys are shipped for restore"
        columns, packed = rows[0]
        keys = [dict(zip(columns, r)) for r in msgpack.unpackb(packed, raw=False)]
        subject_rows = [k for k in keys if k["kind"] == "subject"]
        assert subject_rows and all(k["wrapped"] is None and k["lookup"] is None for k in subject_rows)
        assert any(k["kind"] == "data" and k["wrapped"] for k in keys)
        dump = b"".join(bytes(str(r), "utf-8") for r in conn.execute(
            sql.SQL("SELECT * FROM {}.c_profiles").format(sql.Identifier(pg_schema))).fetchall())
        assert CANARY.encode() not in dump

    ws.close()
    restored = restore(pg_url, "agent", tmp_path / "restored.db", schema=pg_schema, key=key)
    try:
        row = _profiles(restored).get("ada")
        assert row is not None
        assert row["bio"] == f"bio {CANARY}" and row["plain"] == "hello"  # store-wide keys restore
        assert row["email"] is ls.FORGOTTEN  # subject keys never left the laptop
    finally:
        restored.close()


def test_forget_after_sync_leaves_no_key_centrally(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    key = ls.generate_key()
    ws = ls.Workspace(tmp_path / "ws", key=key)
    store = ws.open("agent")
    profiles = _profiles(store)
    profiles.put_many([{"pid": p, "email": f"{p}@example.org"} for p in ("ada", "bob")])
    _sync(ws, pg_url, pg_schema)
    assert store.forget("ada")
    _sync(ws, pg_url, pg_schema)
    assert profiles.get("ada")["email"] is ls.FORGOTTEN
    assert profiles.get("bob")["email"] == "bob@example.org"
    ws.close()
    restored = restore(pg_url, "agent", tmp_path / "restored.db", schema=pg_schema, key=key)
    try:
        assert all(r["email"] is ls.FORGOTTEN for r in _profiles(restored).find())
    finally:
        restored.close()
