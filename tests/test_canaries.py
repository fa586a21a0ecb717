"""Plaintext canaries: values of encrypted fields never appear in the clear anywhere they travel.

Unique canary strings go into encrypted fields (some compressed too) of several stores,
are written, updated, synced to a real Postgres, backed up, exported and restored. Then
the bytes of every place they may land are searched: the store files and their WALs,
backups, the raw-SQL export, the kit views, restored stores, every central table (dumped
with binary COPY, so bytea and text are searched as they are, not hex-escaped), and
Postgres's own data directory including ``pg_wal`` after a checkpoint and a WAL switch.
Each search must find 0 canaries of encrypted fields. A canary in a plain field is
expected to be found in each place: that positive control shows each search can see.

Decrypting outputs are the owner reading their own data (``LearningProfiles.export``
with the key is a subject-access export): their canaries are expected, their files are
0600, and after ``forget`` the export holds none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from localstore.sync import SyncEngine, restore
from localstore.sync.views import create_kit_views
from pg_fixture import PgServer
from psycopg import sql

import localstore as ls
from localstore.kits.profiles import LearningProfiles


class Canaries:
    """Unique strings, split into those written to encrypted fields (secret) and to plain ones (control)."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:12]
        self.secret: list[str] = []
        self.plain: list[str] = []

    def new_secret(self, where: str) -> str:
        value = f"CANARY-{self.tag}-{where}-{len(self.secret)}"
        self.secret.append(value)
        return value

    def new_plain(self, where: str) -> str:
        value = f"PLAINCANARY-{self.tag}-{where}-{len(self.plain)}"
        self.plain.append(value)
        return value

    def hits(self, data: bytes, which: list[str]) -> list[str]:
        """The canaries of ``which`` found in ``data``, as UTF-8 and as UTF-16 (a second common encoding).

        One pass finds the tag every canary carries; only there are the candidates compared.
        """
        found = set()
        for encoding in ("utf-8", "utf-16-le"):
            tag = f"CANARY-{self.tag}-".encode(encoding)
            candidates = [(c, c.encode(encoding)) for c in which]
            pos = data.find(tag)
            while pos != -1:
                for c, raw in candidates:
                    start = pos - (len(raw) - len(raw.split(tag, 1)[1]) - len(tag))
                    if start >= 0 and data.startswith(raw, start):
                        found.add(c)
                pos = data.find(tag, pos + 1)
        return [c for c in which if c in found]


FIELDS = {
    "id": ls.Text(),
    "label": ls.Text(),                                        # plain: the positive control
    "secret": ls.Text(encrypt=True),
    "secret_z": ls.Text(encrypt=True, compress=True),
    "doc": ls.Json(encrypt=True, compress=True),
    "raw": ls.Blob(encrypt=True),
    "email": ls.Text(encrypt=True, blind_index=True),
    "summary": ls.Text(compress=True),                         # plain but compressed: not a secret
}


def _row(c: Canaries, store: str, i: int) -> dict[str, Any]:
    long = c.new_secret(f"{store}-z")
    return {
        "id": f"r{i}",
        "label": c.new_plain(f"{store}-label") if i == 0 else f"label {i}",
        "secret": c.new_secret(f"{store}-secret"),
        "secret_z": (long + " ") * 40,                         # long and repetitive: really compressed
        "doc": {"note": c.new_secret(f"{store}-doc"), "pad": ["x" * 50] * 20},
        "raw": c.new_secret(f"{store}-raw").encode(),
        "email": c.new_secret(f"{store}-email") + "@example.org",
        "summary": f"summary {i} " * 30,
    }


def _files(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out.extend(p for p in sorted(root.rglob("*")) if p.is_file())
    return out


def _read_all(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def _dump_schema(conn: psycopg.Connection[Any], schema: str) -> dict[str, bytes]:
    """Every table (and view) of ``schema``, dumped with binary COPY, by name."""
    out: dict[str, bytes] = {}
    rels = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v') ORDER BY 1", (schema,)).fetchall()
    for name, kind in rels:
        if kind == "p":
            continue  # a partitioned parent holds no rows itself; its partitions are dumped
        buf = bytearray()
        with conn.cursor() as cur:
            stmt = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT (FORMAT binary)").format(sql.Identifier(schema, name))
            with cur.copy(stmt) as cp:
                for chunk in cp:
                    buf += chunk
        out[name] = bytes(buf)
    return out


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "localstore", *args], capture_output=True, env=env, timeout=300, check=False)


def test_canaries_never_appear_in_the_clear(tmp_path: Path, pg_server: PgServer, pg_url: str, pg_schema: str,
                                            subprocess_env: dict[str, str]) -> None:
    c = Canaries()
    key = ls.generate_key()
    ws = ls.Workspace(tmp_path / "ws", key=key)
    stores = [ws.open(f"agent-{i}") for i in range(3)]
    for n, store in enumerate(stores):
        coll = store.collection("vault", key="id", fields=FIELDS)
        coll.put_many([_row(c, store.name, i) for i in range(6)])
        coll.put(_row(c, store.name, 1))                       # an update: new canaries, old ones in history
        coll.delete("r5")
    # The privacy-critical kit: profile values are encrypted under the profile's own key.
    profiles = LearningProfiles(stores[0])
    pid = profiles.create_profile(c.new_plain("profile-id"), user_id=c.new_secret("user"),
                                  learning_style=c.new_secret("style"),
                                  sensitive_data={"diagnosis": c.new_secret("sensitive") * 20})
    profiles.record_session(pid, domain=c.new_secret("domain"), notes=c.new_secret("session-notes") * 10,
                            topics=[c.new_secret("topic")])
    profiles.update_knowledge(pid, c.new_secret("kdomain"), c.new_secret("ktopic"), mastery=0.5, confidence=0.5)
    profiles.update_profile(pid, learning_style=c.new_secret("style-updated"))
    LearningProfiles(stores[1]).create_profile(user_id=c.new_secret("user-b"), learning_style=c.new_secret("style-b"))

    # Sync to Postgres, twice (the second pass ships the writes made after the first).
    engine = SyncEngine(ws, pg_url, schema=pg_schema, watch=False, workers=1)
    try:
        engine.sync_now()
        stores[2].collection("vault").put(_row(c, stores[2].name, 9))
        engine.sync_now()
    finally:
        engine.close()

    # Backups, a raw-SQL export, the kit views, restores.
    backups = tmp_path / "backups"
    backups.mkdir()
    for store in stores:
        store.backup(backups / f"{store.name}.db")
    exports = tmp_path / "exports"
    exports.mkdir()
    env = dict(subprocess_env)
    env.pop("LOCALSTORE_KEY", None)
    outputs: dict[str, bytes] = {}
    for store in stores:
        r = _cli(["query", store.path, "--sql", "SELECT * FROM vault", "--json"], env)
        assert r.returncode == 0, r.stderr
        outputs[f"query --sql {store.name}"] = r.stdout + r.stderr
        (exports / f"{store.name}.json").write_bytes(r.stdout)
        # The export gives stored bytes as base64: decode them too, so a leak cannot hide in an encoding.
        outputs[f"query --sql {store.name} (base64 decoded)"] = _decoded(json.loads(r.stdout))
        r = _cli(["query", store.path, "vault"], env)  # without the key, encrypted fields cannot be read
        outputs[f"query {store.name} without key"] = r.stdout + r.stderr
        for args in (["info", store.path, "--json"], ["stats", store.path, "--json"]):
            r = _cli(args, env)
            assert r.returncode == 0, r.stderr
            outputs[" ".join(args[:1]) + " " + store.name] = r.stdout + r.stderr
    r = _cli(["sync", "status", str(tmp_path / "ws"), "--url", pg_url, "--schema", pg_schema, "--json"], env)
    assert r.returncode == 0, r.stderr
    outputs["sync status"] = r.stdout + r.stderr
    views_schema = "cv_" + uuid.uuid4().hex[:8]
    made = create_kit_views(pg_url, schema=pg_schema, views_schema=views_schema)
    assert "learning_profiles" in made
    r = _cli(["sync", "views", "--url", pg_url, "--schema", pg_schema, "--views-schema", views_schema], env)
    assert r.returncode == 0, r.stderr
    outputs["sync views"] = r.stdout + r.stderr
    restored = tmp_path / "restored"
    restored.mkdir()
    for store in stores:
        back = restore(pg_url, store.name, restored / f"{store.name}.db", schema=pg_schema, key=key)
        try:
            assert back.collection("vault").count() == store.collection("vault").count()
            back.backup(restored / f"{store.name}.backup.db")
        finally:
            back.close()
    r = _cli(["restore", stores[1].name, "--from", pg_url, "--schema", pg_schema, "--to",
              str(restored / "cli-restored.db")], env)
    assert r.returncode == 0, r.stderr
    outputs["restore (CLI)"] = r.stdout + r.stderr

    # The owner's decrypting export: canaries expected (it is the subject-access copy), mode 0600.
    export_path = exports / "profile.json"
    text = profiles.export_json(pid, export_path)
    assert c.hits(text.encode(), c.secret), "the subject-access export decrypts the profile"
    assert export_path.stat().st_mode & 0o777 == 0o600
    # The export after forget: the profile's values are gone from it too.
    profiles.forget(pid)
    assert not c.hits(profiles.export_json(pid).encode(), c.secret)

    # -- the searches --------------------------------------------------------------------------------
    problems: list[str] = []
    found_plain: dict[str, set[str]] = {}

    searched = {"places": 0, "bytes": 0}

    def search(place: str, data: bytes) -> None:
        searched["places"] += 1
        searched["bytes"] += len(data)
        bad = c.hits(data, c.secret)
        if bad:
            problems.append(f"{place}: {bad[:3]}")
        found_plain.setdefault(place.split(":")[0], set()).update(c.hits(data, c.plain))

    local = _files(tmp_path / "ws", backups, exports, restored)
    local = [p for p in local if p != export_path]
    assert any(p.name.endswith(".db-wal") for p in local), "the stores' WAL files are searched too"
    for path, data in _read_all(local).items():
        group = "restored" if restored in path.parents else "backups" if backups in path.parents else (
            "exports" if exports in path.parents else "stores")
        search(f"{group}:{path.name}", data)
    for place, data in outputs.items():
        search(f"outputs:{place}", data)

    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        for schema in (pg_schema, views_schema):
            for table, data in _dump_schema(conn, schema).items():
                search(f"postgres:{schema}.{table}", data)
        tables = _dump_schema(conn, pg_schema)
        assert {"changes_p0", "stores", "dictionaries", "store_tables", "c_vault", "c_learning_profiles"} <= set(tables)
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(views_schema)))
        db_oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]  # type: ignore[index]
        try:  # superuser only (or pg_checkpoint / pg_read_all_settings roles)
            conn.execute("CHECKPOINT")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            data_dir: str | None = conn.execute("SHOW data_directory").fetchone()[0]  # type: ignore[index]
        except psycopg.errors.InsufficientPrivilege:
            data_dir = None

    def check(places: tuple[str, ...]) -> None:
        assert not problems, "plaintext of encrypted fields found:\n" + "\n".join(problems)
        # Positive controls: the plain canaries are found where they should be, so each search can see.
        for place in places:
            assert found_plain.get(place), f"the plain-field canary was not found in {place}: the search is blind there"

    scanned_wal = 0
    if data_dir is None or not (os.access(data_dir, os.R_OK | os.X_OK) and os.path.isdir(os.path.join(data_dir, "pg_wal"))):
        check(("stores", "backups", "restored", "postgres", "outputs"))
        pytest.skip(f"Postgres's data directory ({data_dir or 'not shown to this role'}) is not readable here "
                    "(a remote server?): every other place was searched and had 0 canaries of encrypted fields")
    else:
        # This database's files, the shared catalogs, the WAL and the server's log; not other databases.
        root = Path(data_dir)
        for path in _files(root / "base" / str(db_oid), root / "global", root / "pg_wal", root / "log",
                           root / "pg_xact", root / "pg_logical"):
            try:
                data = path.read_bytes()
            except OSError:
                continue  # a file removed by the server while walking (a recycled WAL segment)
            place = "pg_wal" if "pg_wal" in path.parts else "pgdata"
            scanned_wal += place == "pg_wal"
            search(f"{place}:{path.relative_to(data_dir)}", data)
    check(("stores", "backups", "restored", "postgres", "outputs", "pg_wal", "pgdata"))
    assert scanned_wal > 0
    print(f"canaries: {len(c.secret)} in encrypted fields, {len(c.plain)} plain controls; searched "
          f"{searched['places']} files, tables and outputs ({searched['bytes'] / 2**20:.1f} MiB, "
          f"{scanned_wal} WAL segments): 0 hits")
    ws.close()


def _decoded(value: Any) -> bytes:
    """Every ``{"base64": ...}`` value of a JSON export, decoded and concatenated."""
    import base64

    if isinstance(value, dict):
        if set(value) == {"base64"}:
            return base64.b64decode(value["base64"])
        return b"".join(_decoded(v) for v in value.values())
    if isinstance(value, list):
        return b"".join(_decoded(v) for v in value)
    return b""


def test_the_canary_search_sees_what_it_must() -> None:
    """The search itself: UTF-8 and UTF-16, at any offset, next to any byte; secrets never match controls."""
    c = Canaries()
    secret, plain, other = c.new_secret("s"), c.new_plain("p"), c.new_secret("t")
    data = b"\x00\xffab" + secret.encode() + b"7" + plain.encode() + b"\x01" + other.encode("utf-16-le")
    assert c.hits(data, c.secret) == [secret, other]
    assert c.hits(data, c.plain) == [plain]
    assert c.hits(plain.encode(), c.secret) == []                  # a control never counts as a leak
    assert c.hits(secret.encode()[:-1], c.secret) == []            # a truncated canary is not one
    assert c.hits(b"", c.secret) == [] and c.hits(data, []) == []
