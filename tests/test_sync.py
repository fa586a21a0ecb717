"""The sync engine against a real Postgres: convergence, idempotence, lost acks, restore, pull, schema."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from _sync_workers import assert_converged, central_rows
from localstore.sync import (
    Central,
    CentralSchemaError,
    RestoreError,
    SeqConflictError,
    SyncEngine,
    restore,
    subscribe,
)
from localstore.sync.shipper import sync_store
from psycopg import sql

import localstore as ls
from localstore import replica

FIELDS = {
    "id": ls.Text(),
    "god": ls.Text(index=True),
    "n": ls.Integer(),
    "phi": ls.Real(),
    "ok": ls.Boolean(),
    "basin": ls.Vector(16),
    "state": ls.Array(),
    "meta": ls.Json(),
    "raw": ls.Blob(),
}


def _row(rng: random.Random, key: str) -> dict[str, object]:
    return {
        "id": key,
        "god": rng.choice(["zeus", "hera", "ares", None]),
        "n": rng.randint(-10**12, 10**12),
        "phi": rng.random(),
        "ok": rng.random() < 0.5,
        "basin": np.random.default_rng(rng.randint(0, 10**9)).random(16),
        "state": np.arange(rng.randint(1, 6), dtype="<i4").reshape(-1, 1),
        "meta": {"b": rng.random(), "a": [1, "two", None], "z": {"k": key}},
        "raw": rng.randbytes(rng.randint(0, 40)),
    }


def _write_mixed(store: ls.Store, seed: int, n: int = 300) -> None:
    rng = random.Random(seed)
    kernels = store.collection("kernels", key="id", fields=FIELDS)
    notes = store.collection("notes", key="nid", fields={"nid": ls.Integer(), "text": ls.Text(), "tags": ls.Json()})
    kernels.put_many([_row(rng, f"k{i}") for i in range(n)])
    for _ in range(n // 3):  # updates
        kernels.put(_row(rng, f"k{rng.randrange(n)}"))
    kernels.delete_many([f"k{rng.randrange(n)}" for _ in range(n // 10)])
    notes_odd = {"nid": -1, "text": "NUL \x00 inside", "tags": ["\x00"]}  # Postgres text cannot hold NUL
    with store.transaction():
        notes.put_many([{"nid": i, "text": f"note {i} of {store.name}", "tags": ["x", i]} for i in range(50)])
        notes.put(notes_odd)
        notes.delete(7)
    store.collection("scratch", key="id", fields={"id": ls.Text(), "v": ls.Real()}, sync=False).put({"id": "x", "v": 1.0})


def _engine(ws: ls.Workspace, url: str, schema: str, **kw: object) -> SyncEngine:
    return SyncEngine(ws, url, schema=schema, watch=False, **kw)  # type: ignore[arg-type]


def test_exact_convergence_of_several_stores(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    stores = [ws.open(f"agent-{i}") for i in range(3)]
    for i, s in enumerate(stores):
        _write_mixed(s, seed=i)
    engine = _engine(ws, pg_url, pg_schema, batch_rows=97)
    try:
        shipped = engine.sync_now()
        assert shipped == sum(s.changelog.last_seq() for s in stores)
        for i, s in enumerate(stores):  # more writes after a first sync, then sync again
            _write_mixed(s, seed=100 + i, n=60)
        engine.sync_now()
    finally:
        engine.close()
    for s in stores:
        assert_converged(pg_url, pg_schema, s)
    with psycopg.connect(pg_url) as conn:
        # Plain typed, queryable columns; pgvector for vectors.
        types = dict(conn.execute(
            "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns c "
            "JOIN pg_attribute a ON a.attname = c.column_name AND a.attrelid = (quote_ident(%s) || '.c_kernels')::regclass "
            "WHERE c.table_schema = %s AND c.table_name = 'c_kernels'", (pg_schema, pg_schema)).fetchall())
        assert types["phi"] == "double precision" and types["n"] == "bigint" and types["meta"] == "jsonb"
        assert types["basin"] == "vector(16)" and types["raw"] == "bytea" and types["ok"] == "boolean"
        # Cross-agent similarity in SQL.
        hits = conn.execute(sql.SQL("SELECT _ls_store, id FROM {} WHERE NOT _ls_deleted ORDER BY basin <=> %s::vector LIMIT 5")
                            .format(sql.Identifier(pg_schema, "c_kernels")), ("[" + ",".join(["0.5"] * 16) + "]",)).fetchall()
        assert len(hits) == 5
        # sync=False collections never reach Postgres.
        assert conn.execute("SELECT to_regclass(%s)", (f"{pg_schema}.c_scratch",)).fetchone()[0] is None  # type: ignore[index]
        reg = conn.execute(sql.SQL("SELECT name, last_seq FROM {} ORDER BY name").format(
            sql.Identifier(pg_schema, "stores"))).fetchall()
        assert reg == [(s.name, s.changelog.last_seq()) for s in stores]
        parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = (quote_ident(%s) || '.changes')::regclass",
                             (pg_schema,)).fetchone()[0]  # type: ignore[index]
        assert parts >= 2  # hash-partitioned by store_id
    ws.close()


def test_without_pgvector_vectors_are_real_arrays(tmp_path: Path, pg_url: str, pg_schema: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import localstore.sync.central as central_mod

    ws = ls.Workspace(tmp_path / "ws")
    s = ws.open("a")
    _write_mixed(s, seed=12, n=40)
    central_mod._vector_warned = False
    with caplog.at_level("WARNING", logger="localstore.sync"):
        engine = _engine(ws, pg_url, pg_schema, pgvector=False)
        try:
            engine.sync_now()
            engine.sync_now()
        finally:
            engine.close()
    warnings = [r for r in caplog.records if "real[]" in r.getMessage()]
    assert len(warnings) == 1  # said once
    assert_converged(pg_url, pg_schema, s)  # vectors compared within float tolerance
    with psycopg.connect(pg_url) as conn:
        kind = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attname = 'basin' "
                            "AND attrelid = (quote_ident(%s) || '.c_kernels')::regclass", (pg_schema,)).fetchone()[0]  # type: ignore[index]
    assert kind == "real[]"
    ws.close()


def _dump(url: str, schema: str) -> list[object]:
    with psycopg.connect(url) as conn:
        out: list[object] = []
        for table in ("changes", "c_kernels", "c_notes"):
            cols = "*" if table == "changes" else "_ls_store, _ls_key, _ls_seq, _ls_hlc, _ls_deleted"
            out.append(conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY 1, 2").format(
                sql.SQL(cols), sql.Identifier(schema, table))).fetchall())
        return out


def test_a_replayed_batch_has_no_effect(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    _write_mixed(store, seed=3, n=100)
    central = Central(pg_url, pg_schema)
    try:
        sync_store(central, store)
        before = _dump(pg_url, pg_schema)
        info = central.register(store.id, store.name, "", replica.collection_specs(store), [])
        everything = store.changelog.stored_changes(0, limit=1_000_000, max_bytes=1 << 40)
        central.ship(info, everything)  # the whole log again
        central.ship(info, everything[10:50])  # and an old batch after newer ones
        assert _dump(pg_url, pg_schema) == before
    finally:
        central.close()
    assert_converged(pg_url, pg_schema, store)


def test_failure_after_commit_before_the_watermark_is_harmless(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    _write_mixed(store, seed=4, n=120)
    central = Central(pg_url, pg_schema)
    calls: list[int] = []

    def crash_once(seq: int) -> None:
        calls.append(seq)
        if len(calls) == 2:
            raise RuntimeError("crash between the Postgres commit and the watermark write")

    try:
        with pytest.raises(RuntimeError):
            sync_store(central, store, batch_rows=50, after_commit=crash_once)
        committed = calls[-1]
        assert store.changelog.watermark() == calls[0] < committed  # Postgres is ahead of the store
        assert central.position(store.id) == committed
        result = sync_store(central, store, batch_rows=50)
        assert result.acked_lost
        assert result.shipped == store.changelog.last_seq() - committed  # nothing shipped twice
    finally:
        central.close()
    assert_converged(pg_url, pg_schema, store)


def test_a_stale_copy_of_a_store_is_refused(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    s = ls.open(tmp_path / "a.db")
    _write_mixed(s, seed=5, n=30)
    s.backup(tmp_path / "old.db")
    s.collection("kernels").put(_row(random.Random(1), "late"))
    central = Central(pg_url, pg_schema)
    try:
        sync_store(central, s)
        old = ls.open(tmp_path / "old.db")
        with pytest.raises(SeqConflictError, match="older copy"):
            sync_store(central, old)
        assert old.changelog.watermark() == 0  # untouched
        old.close()
    finally:
        central.close()
        s.close()


def test_restore_round_trip_and_continued_writes(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    s = ws.open("kernel-7")
    _write_mixed(s, seed=6, n=150)
    engine = _engine(ws, pg_url, pg_schema)
    engine.sync_now()
    original = {name: {str(r[s.collection(name).key]): r for r in s.collection(name).find()}
                for name in ("kernels", "notes")}
    specs = [sp for sp in replica.collection_specs(s) if sp["sync"]]
    last = s.changelog.last_seq()
    sid = s.id
    ws.close()
    engine.close()
    (tmp_path / "ws" / "kernel-7.db").rename(tmp_path / "dead.db")  # the laptop died

    with pytest.raises(RestoreError, match="no store named"):
        restore(pg_url, "nobody", tmp_path / "x.db", schema=pg_schema)
    r = restore(pg_url, "kernel-7", tmp_path / "ws" / "kernel-7.db", schema=pg_schema)
    try:
        assert r.id == sid
        assert r.verify().ok, r.verify().problems
        assert [sp for sp in replica.collection_specs(r) if sp["sync"]] == specs  # same schema, same field order
        for name, rows in original.items():
            got = {str(row[r.collection(name).key]): row for row in r.collection(name).find()}
            assert set(got) == set(rows)
            for key, row in rows.items():
                for fname, value in row.items():
                    other = got[key][fname]
                    if isinstance(value, np.ndarray):
                        assert np.array_equal(value, other) and value.dtype == other.dtype
                    else:
                        assert value == other, (name, key, fname)
        assert r.changelog.last_seq() == last and r.changelog.pending() == 0
        r.collection("kernels").put(_row(random.Random(9), "after-restore"))
        r.collection("notes").delete(3)
        assert r.changelog.last_seq() == last + 2  # continues, never reuses
        assert r.verify().ok
    finally:
        r.close()
    engine = _engine(ls.Workspace(tmp_path / "ws"), pg_url, pg_schema)
    try:
        assert engine.sync_now() == 2
    finally:
        engine.close()
    with ls.open(tmp_path / "ws" / "kernel-7.db") as again:
        assert_converged(pg_url, pg_schema, again)
    with pytest.raises(RestoreError, match="already exists"):
        restore(pg_url, "kernel-7", tmp_path / "ws" / "kernel-7.db", schema=pg_schema)


def test_pull_subscribes_to_other_stores_rows_last_writer_wins(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    a, b = ws.open("a"), ws.open("b")
    fields = {"fact": ls.Text(), "value": ls.Real(), "v": ls.Vector(4)}
    fa = a.collection("facts", key="fact", fields=fields)
    fb = b.collection("facts", key="fact", fields=fields)
    fa.put_many([{"fact": f"f{i}", "value": float(i), "v": [i, 0, 0, 1]} for i in range(20)])
    # HLCs of two stores order by wall-clock millisecond first: within the same millisecond a's
    # 20 puts would count past b's one (a put_many of 20 rows can take well under 1 ms).
    time.sleep(0.002)
    fb.put({"fact": "f3", "value": -1.0})   # b's own version of f3, written later: it wins over a's
    fb.put({"fact": "mine", "value": 42.0})
    subscribe(b, "facts")
    engine = _engine(ws, pg_url, pg_schema)
    try:
        engine.sync_now()
        engine.sync_now()  # a's rows reach Postgres in the first pass; b pulls them in either
        assert fb.get("f3")["value"] == -1.0
        assert fb.get("f5")["value"] == 5.0 and list(fb.get("f5")["v"]) == [5, 0, 0, 1]
        assert replica.origin(b, "facts", "f5") == a.id
        assert replica.origin(b, "facts", "f3") is None and replica.origin(b, "facts", "mine") is None
        # A later write by a wins over b's older one; a delete by a removes the row in b.
        fa.put({"fact": "f3", "value": 33.0})
        fa.delete("f6")
        engine.sync_now()
        engine.sync_now()
        assert fb.get("f3")["value"] == 33.0 and replica.origin(b, "facts", "f3") == a.id
        assert fb.get("f6") is None
        assert b.verify().ok, b.verify().problems
        # Pulled rows are not b's changes: they never ship back under b's id.
        assert {k for k, r in central_rows(pg_url, pg_schema, b.id, "facts").items()} == {"f3", "mine"}
        # b writing a pulled key makes the row b's own again.
        fb.put({"fact": "f5", "value": 55.0})
        assert replica.origin(b, "facts", "f5") is None
        engine.sync_now()
        assert central_rows(pg_url, pg_schema, b.id, "facts")["f5"]["value"] == 55.0
        assert b.verify().ok and a.verify().ok
    finally:
        engine.close()
        ws.close()


def test_schema_versioning_refuses_a_newer_central_schema(pg_url: str, pg_schema: str) -> None:
    c = Central(pg_url, pg_schema)
    c.connect()
    c.run("faking a newer schema", lambda conn: conn.execute(
        sql.SQL("UPDATE {} SET value = '999' WHERE key = 'schema_version'").format(sql.Identifier(pg_schema, "meta"))))
    c.close()
    with pytest.raises(CentralSchemaError, match="newer"):
        Central(pg_url, pg_schema).connect()


def test_hnsw_option_indexes_vector_columns(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    store.collection("emb", key="id", fields={"id": ls.Text(), "e": ls.Vector(8, metric="l2")}).put(
        {"id": "a", "e": [1] * 8})
    central = Central(pg_url, pg_schema, hnsw=True)
    try:
        sync_store(central, store)
    finally:
        central.close()
    with psycopg.connect(pg_url) as conn:
        defs = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'c_emb'",
                                           (pg_schema,))]
    assert any("hnsw" in d and "vector_l2_ops" in d for d in defs), defs


def test_in_process_engine_stops_cleanly(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    s = ws.open("a")
    _write_mixed(s, seed=8, n=200)
    engine = SyncEngine(ws, pg_url, schema=pg_schema, batch_rows=50).start()
    engine.stop()
    assert not engine.running
    # Whatever it did, what it acknowledged is in Postgres, and a second engine finishes the job.
    engine = _engine(ws, pg_url, pg_schema)
    engine.sync_now()
    engine.close()
    assert_converged(pg_url, pg_schema, s)
    ws.close()


def _encryption_available() -> bool:
    try:
        ls.Text(encrypt=True).bind("c", "f")
    except ls.LocalStoreError:
        return False
    return True


@pytest.mark.skipif(not _encryption_available(), reason="encrypted fields are not implemented in this build")
def test_encrypted_and_compressed_fields_ship_as_bytes_and_restore(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    import base64
    import os

    master = os.urandom(32)
    key = base64.b64encode(master).decode()
    rng = random.Random(11)
    words = ["basin", "kernel", "drift", "regime", "phi", "geometric", "observation", "memory", "agent", "plan", "reflect", "tensor"]
    ws = ls.Workspace(tmp_path / "ws", key=key)
    s = ws.open("vault")
    coll = s.collection("docs", key="id", fields={
        "id": ls.Text(), "secret": ls.Text(encrypt=True), "body": ls.Text(compress=True),
        "both": ls.Json(encrypt=True, compress=True), "plain": ls.Real()})
    for start in range(0, 2400, 400):  # enough compressible text for a trained dictionary
        coll.put_many([{"id": f"d{i}", "secret": f"TOPSECRET-{i}-{rng.random()}",
                        "body": " ".join(rng.choice(words) for _ in range(80)) + f" #{i}",
                        "both": {"ssn": f"TOPSECRET-{i}"}, "plain": i / 7} for i in range(start, start + 400)])
    engine = _engine(ws, pg_url, pg_schema)
    try:
        engine.sync_now()
    finally:
        engine.close()
    assert_converged(pg_url, pg_schema, s)  # ciphertext and compressed bytes byte-for-byte
    local_dicts = replica.local_dictionaries(s)
    with psycopg.connect(pg_url) as conn:
        q = lambda t, col: conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE position(%s IN {}) > 0").format(
            sql.Identifier(pg_schema, t), sql.Identifier(col)), (b"TOPSECRET",)).fetchone()[0]  # type: ignore[index]
        assert q("changes", "payload") == 0 and q("c_docs", "secret") == 0 and q("c_docs", "both") == 0
        assert q("store_tables", "rows") == 0
        for table, col in (("changes", "payload"), ("store_tables", "rows"), ("dictionaries", "data")):
            hit = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE position(%s IN {}) > 0").format(
                sql.Identifier(pg_schema, table), sql.Identifier(col)), (master,)).fetchone()[0]  # type: ignore[index]
            assert hit == 0, f"the master key reached {table}"
        types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                  "WHERE table_schema = %s AND table_name = 'c_docs'", (pg_schema,)).fetchall())
        assert types["secret"] == types["both"] == types["body"] == "bytea" and types["plain"] == "double precision"
        central_dicts = conn.execute(sql.SQL("SELECT dict_id, data FROM {} WHERE store_id = %s ORDER BY dict_id").format(
            sql.Identifier(pg_schema, "dictionaries")), (s.id,)).fetchall()
    assert local_dicts, "the test wrote too little to train a dictionary"
    assert [(d["dict_id"], d["data"]) for d in sorted(local_dicts, key=lambda d: d["dict_id"])] == \
        [(i, bytes(b)) for i, b in central_dicts]
    expected = {r["id"]: r for r in coll.find()}
    sid = s.id
    ws.close()
    r = restore(pg_url, "vault", tmp_path / "restored.db", schema=pg_schema, key=key)
    try:
        assert r.id == sid and r.verify().ok
        assert replica.local_dictionaries(r) == local_dicts
        got = {row["id"]: row for row in r.collection("docs").find()}
        assert got == expected  # decrypted with the master key, decompressed with the shipped dictionaries
        r.collection("docs").put({"id": "new", "secret": "after restore", "body": "x", "plain": 1.0})
        assert r.collection("docs").get("new")["secret"] == "after restore"
    finally:
        r.close()


def test_payloads_reach_the_change_log_byte_for_byte(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    _write_mixed(store, seed=11, n=80)
    stored = {c.seq: c.packed for c in store.changelog.stored_changes(0, limit=1_000_000, max_bytes=1 << 40)}
    central = Central(pg_url, pg_schema)
    try:
        sync_store(central, store, batch_rows=33)
    finally:
        central.close()
    with psycopg.connect(pg_url) as conn:
        shipped = dict(conn.execute(sql.SQL("SELECT seq, payload FROM {} WHERE store_id = %s").format(
            sql.Identifier(pg_schema, "changes")), (store.id,)).fetchall())
    assert shipped.keys() == stored.keys()
    # Rows read from their table are packed as the store would; superseded ones go as stored.
    assert all((None if shipped[seq] is None else bytes(shipped[seq])) == packed for seq, packed in stored.items())
    assert any(c.values is None and c.packed for c in store.changelog.stored_changes(0, limit=1_000_000))


def test_a_registry_behind_the_change_log_is_merged_conflict_safe(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    _write_mixed(store, seed=12, n=60)
    central = Central(pg_url, pg_schema)
    try:
        sync_store(central, store)
        before = _dump(pg_url, pg_schema)
        with psycopg.connect(pg_url) as conn:  # as if edited by hand: Postgres forgets what it holds
            conn.execute(sql.SQL("UPDATE {} SET last_seq = 0").format(sql.Identifier(pg_schema, "stores")))
        info = central.register(store.id, store.name, "", replica.collection_specs(store), [])
        central.ship(info, store.changelog.stored_changes(0, limit=1_000_000, max_bytes=1 << 40))
        assert _dump(pg_url, pg_schema) == before  # no duplicate, no state moved back
        assert central.position(store.id) == store.changelog.last_seq()
    finally:
        central.close()
    assert_converged(pg_url, pg_schema, store)


def test_a_key_holding_nul_is_shipped(store: ls.Store, pg_url: str, pg_schema: str) -> None:
    notes = store.collection("notes", key="nid", fields={"nid": ls.Text(), "text": ls.Text()})
    notes.put_many([{"nid": "plain", "text": "a"}, {"nid": "odd\x00key", "text": "b\x00c"}])
    central = Central(pg_url, pg_schema)
    try:
        assert sync_store(central, store).shipped == 2
    finally:
        central.close()
    with psycopg.connect(pg_url) as conn:
        keys = [r[0] for r in conn.execute(sql.SQL("SELECT _ls_key FROM {} ORDER BY 1").format(
            sql.Identifier(pg_schema, "c_notes"))).fetchall()]
    assert keys == ["odd\ufffdkey", "plain"]
    assert_converged(pg_url, pg_schema, store)


def test_the_reader_refuses_a_row_changed_outside_localstore(tmp_path: Path) -> None:
    import apsw

    from localstore.errors import ChangeLogError

    s = ls.open(tmp_path / "a.db")
    notes = s.collection("notes", key="nid", fields={"nid": ls.Text(), "text": ls.Text()})
    notes.put_many([{"nid": f"n{i}", "text": "x"} for i in range(5)])
    good = s.changelog.stored_changes(0)
    assert [c.values for c in good] == [(f"n{i}", "x") for i in range(5)]
    assert [c.packed for c in good] == [ls_pack(c.values) for c in good]
    s.close()
    raw = apsw.Connection(str(tmp_path / "a.db"))  # no localstore triggers: the change record is left as it was
    raw.execute("UPDATE notes SET _ls_seq = 99 WHERE nid = 'n2'")
    raw.close()
    s = ls.open(tmp_path / "a.db")
    with pytest.raises(ChangeLogError, match="change 3 .* no longer holds it"):
        s.changelog.stored_changes(0)
    assert [c.seq for c in s.changelog.stored_changes(0, limit=2)] == [1, 2]  # before it, all is well
    s.close()


def ls_pack(values: tuple[object, ...] | None) -> bytes:
    """A payload as the store packs it: a msgpack map of the fields, key first."""
    import msgpack

    assert values is not None
    return msgpack.packb(dict(zip(("nid", "text"), values)), use_bin_type=True)  # type: ignore[no-any-return]
