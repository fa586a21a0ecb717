"""Bad input and bad files: every failure is a LocalStoreError that names its subject and changes nothing."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest

import localstore as ls


def _make_store(path: Path, rows: int = 200) -> None:
    with ls.open(path) as s:
        coll = s.collection("items", key="k", fields={"k": ls.Text(), "n": ls.Integer(), "blob": ls.Blob()})
        coll.put_many([{"k": f"k{i}", "n": i, "blob": bytes([i % 256]) * 300} for i in range(rows)])
        for i in range(0, rows, 3):
            coll.put({"k": f"k{i}", "n": -i})
        s.changelog.ack(min(10, s.changelog.last_seq()))


def _exercise(path: Path) -> ls.VerifyReport:
    """Open a store and touch everything: schema, rows, change log, a write; return verify's report."""
    with ls.open(path) as s:
        for name in s.collections():
            coll = s.collection(name)
            coll.find()
            coll.count()
        s.changelog.changes(limit=1_000_000)
        s.changelog.pending()
        if "items" in s.collections():
            s.collection("items").put({"k": "new"})
        return s.verify()


def _assert_damage_reported(path: Path) -> None:
    """Damage must surface as a LocalStoreError (never a raw apsw error) or as a failed verify()."""
    try:
        report = _exercise(path)
    except ls.LocalStoreError as exc:
        assert not isinstance(exc, apsw.Error)
        return
    assert not report.ok, "a damaged store was reported healthy"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- files that are not stores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [random.Random(0).randbytes(8192), random.Random(1).randbytes(100), b"abc", b"SQLite format 3",
     b"SQLite format 3\x00" + random.Random(2).randbytes(4096), b"\x00" * 4096],
    ids=["random-8k", "random-100", "3-bytes", "magic-prefix-only", "magic-then-garbage", "zeros"],
)
def test_non_store_file_is_not_a_store_and_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(content)
    with pytest.raises(ls.NotAStoreError) as info:
        ls.open(path)
    assert isinstance(info.value, ls.StoreOpenError)
    assert not isinstance(info.value, apsw.Error)
    assert str(path) in str(info.value)
    assert _files(tmp_path) == {"junk.db": content}


def _other_programs_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kernels(id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO kernels(name) VALUES (?)", [("zeus",), ("hera",)])
    conn.commit()
    conn.close()


def test_other_programs_sqlite_db_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    _other_programs_db(path)
    with pytest.raises(ls.NotAStoreError, match="another program"):
        ls.open(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM kernels ORDER BY id").fetchall() == [("zeus",), ("hera",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
        assert not any(t.startswith("_ls") for t in tables)
    finally:
        conn.close()


def test_other_programs_sqlite_db_bytes_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    _other_programs_db(path)
    before = _files(tmp_path)
    with pytest.raises(ls.NotAStoreError):
        ls.open(path)
    assert _files(tmp_path) == before
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()


def test_other_programs_wal_db_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ls.NotAStoreError):
        ls.open(path)
    assert path.read_bytes() == before


def test_empty_sqlite_db_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # a zero-byte file
    with ls.open(path) as s:
        assert s.collections() == []
        s.collection("c", key="k", fields={"k": ls.Text()}).put({"k": "a"})
    with ls.open(path) as s:
        assert s.collection("c").keys() == ["a"]


@pytest.mark.parametrize(
    ("sql", "match"),
    [("UPDATE _ls_meta SET value = 99 WHERE key = 'format'", "format"),
     ("DELETE FROM _ls_meta WHERE key = 'store_id'", "store id")],
    ids=["newer-format", "no-store-id"],
)
def test_unusable_store_metadata_is_not_a_store(store_path: Path, sql: str, match: str) -> None:
    _make_store(store_path, rows=3)
    conn = apsw.Connection(str(store_path))
    conn.execute(sql)
    conn.close()
    with pytest.raises(ls.NotAStoreError, match=match):
        ls.open(store_path)


# -- damaged stores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.2, 0.05], ids=lambda f: f"keep-{int(f * 100)}pct")
def test_truncated_store_raises_localstore_error(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "s.db"
    _make_store(path)
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(int(size * fraction) // 4096 * 4096 + 100)
    _assert_damage_reported(path)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_store_with_garbage_pages_raises_localstore_error(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "s.db"
    _make_store(path)
    rng = random.Random(seed)
    pages = path.stat().st_size // 4096
    with path.open("r+b") as handle:
        for page in rng.sample(range(1, pages), k=max(3, pages // 4)):
            handle.seek(page * 4096)
            handle.write(rng.randbytes(4096))
    _assert_damage_reported(path)


@pytest.fixture
def corrupt_changelog(tmp_path: Path) -> Iterator[ls.Store]:
    """An opened store whose change-log root page is overwritten with garbage; its rows are intact."""
    path = tmp_path / "s.db"
    _make_store(path, rows=50)
    conn = apsw.Connection(str(path))
    root = int(conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = '_ls_changes'").fetchall()[0][0])  # type: ignore[arg-type]
    page_size = int(conn.execute("PRAGMA page_size").fetchall()[0][0])  # type: ignore[arg-type]
    conn.close()
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xff" * page_size)
    s = ls.open(path)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s: s.collection("items").put({"k": "new"}), id="put"),
        pytest.param(lambda s: s.changelog.prune(keep=0), id="prune"),
        pytest.param(lambda s: s.collection("items").delete("k1"), id="delete"),
        pytest.param(lambda s: s.changelog.changes(), id="changes"),
        pytest.param(lambda s: s.changelog.pending(), id="pending"),
    ],
)
def test_damaged_change_log_raises_corrupt_store_error(
    corrupt_changelog: ls.Store, operation: Callable[[ls.Store], Any]
) -> None:
    with pytest.raises(ls.CorruptStoreError) as info:
        operation(corrupt_changelog)
    assert not isinstance(info.value, apsw.Error)
    assert corrupt_changelog.path in str(info.value)


def test_damaged_change_log_leaves_rows_readable(corrupt_changelog: ls.Store) -> None:
    coll = corrupt_changelog.collection("items")
    row = coll.get("k1")
    assert row is not None and row["n"] == 1


# -- paths that cannot be stores -----------------------------------------------------------------------


def test_directory_path_is_store_open_error(tmp_path: Path) -> None:
    with pytest.raises(ls.StoreOpenError, match="directory"):
        ls.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_folder_is_store_open_error(tmp_path: Path) -> None:
    with pytest.raises(ls.StoreOpenError) as info:
        ls.open(tmp_path / "no" / "such" / "agent.db")
    assert not isinstance(info.value, ls.NotAStoreError)
    assert not (tmp_path / "no").exists()


def test_missing_file_with_create_false_is_store_open_error(tmp_path: Path) -> None:
    with pytest.raises(ls.StoreOpenError):
        ls.open(tmp_path / "agent.db", create=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("make", "says"), [
    (lambda d: (d / "file").touch() or d / "file" / "agent.db", "Not a directory"),
    (lambda d: d / ("a" * 300 + ".db"), "File name too long"),
    (lambda d: (d / "loop").symlink_to(d / "loop") or d / "loop", "Too many levels of symbolic links"),
])
def test_unreadable_store_paths_say_why(tmp_path: Path, make: Any, says: str) -> None:
    """The store header is read without a descriptor of ours; a path it cannot take still gets the system's reason."""
    with pytest.raises(ls.StoreOpenError, match=says):
        ls.open(make(tmp_path))


def test_symlinked_store_path_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    _make_store(real, rows=1)
    link = tmp_path / "link.db"
    link.symlink_to(real)
    with pytest.raises(ls.StoreOpenError):
        ls.open(link)


# -- bad values ------------------------------------------------------------------------------------------


@pytest.fixture
def kernels(store: ls.Store) -> ls.Collection:
    """A collection with one stored row per key k1..k3 and an Integer-keyed sibling."""
    coll = store.collection("kernels", key="kid", fields={
        "kid": ls.Text(),
        "phi": ls.Real(),
        "step": ls.Integer(nullable=False),
        "alive": ls.Boolean(),
        "basin": ls.Vector(3),
        "state": ls.Array(),
        "meta": ls.Json(),
        "raw": ls.Blob(),
    })
    coll.put_many([{"kid": f"k{i}", "phi": i / 10, "step": i, "meta": {"i": i}} for i in range(1, 4)])
    return coll


def _snapshot(store: ls.Store) -> tuple[Any, ...]:
    coll = store.collection("kernels")
    rows = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in coll.find()]
    changes = [(c.seq, c.hlc, c.op, c.key, c.payload) for c in store.changelog.changes()]
    return rows, changes, store.changelog.last_seq(), store.verify().ok


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"kid": "k1", "phi": "high", "step": 1}, "phi"),
        ({"kid": "k1", "phi": True, "step": 1}, "phi"),
        ({"kid": "k1", "step": 1.5}, "step"),
        ({"kid": "k1", "step": "1"}, "step"),
        ({"kid": "k1", "step": None}, "step"),
        ({"kid": "k1"}, "step"),
        ({"kid": "k1", "step": 1, "alive": "yes"}, "alive"),
        ({"kid": "k1", "step": 1, "basin": [1, 2]}, "basin"),
        ({"kid": "k1", "step": 1, "basin": "abc"}, "basin"),
        ({"kid": "k1", "step": 1, "state": [1, 2]}, "state"),
        ({"kid": "k1", "step": 1, "meta": {"bad": float("nan")}}, "meta"),
        ({"kid": "k1", "step": 1, "raw": "text"}, "raw"),
        ({"kid": 1, "step": 1}, "kid"),
        ({"kid": b"k1", "step": 1}, "kid"),
        ({"kid": None, "step": 1}, "kid"),
        ({"step": 1}, "kid"),
        ({"kid": "k1", "step": 1, "unknown_field": 1}, "unknown_field"),
        ({"kid": "k1", "step": 1, "Phi": 0.5}, "Phi"),
    ],
    ids=["real-str", "real-bool", "int-float", "int-str", "required-none", "required-missing", "bool-str",
         "vector-short", "vector-str", "array-list", "json-nan", "blob-str", "key-int", "key-bytes", "key-none",
         "key-missing", "unknown-field", "wrong-case-field"],
)
def test_bad_row_is_validation_error_naming_collection_and_field(
    store: ls.Store, kernels: ls.Collection, row: dict[str, Any], field: str
) -> None:
    before = _snapshot(store)
    with pytest.raises(ls.ValidationError) as info:
        kernels.put(row)
    message = str(info.value)
    assert "kernels" in message
    assert field in message
    assert isinstance(info.value, ValueError) and not isinstance(info.value, apsw.Error)
    assert _snapshot(store) == before


@pytest.mark.parametrize("row", [["kid", "k1"], "k1", None, 5, ("kid", "k1")], ids=repr)
def test_non_dict_row_is_validation_error(store: ls.Store, kernels: ls.Collection, row: Any) -> None:
    before = _snapshot(store)
    with pytest.raises(ls.ValidationError, match="kernels"):
        kernels.put(row)
    assert _snapshot(store) == before


@pytest.mark.parametrize("position", [0, 2, 5], ids=["first", "middle", "last"])
def test_failing_row_in_put_many_writes_nothing(store: ls.Store, kernels: ls.Collection, position: int) -> None:
    before = _snapshot(store)
    rows: list[dict[str, Any]] = [
        {"kid": "new0", "step": 0},
        {"kid": "k1", "step": 100},  # an overwrite of a stored row
        {"kid": "new1", "step": 1},
        {"kid": "k2", "step": 3},
        {"kid": "new2", "step": 2},
    ]
    rows.insert(position, {"kid": "bad", "step": "not an int"})
    with pytest.raises(ls.ValidationError, match=r"kernels\.step"):
        kernels.put_many(rows)
    assert _snapshot(store) == before
    assert kernels.get_many(["new0", "new1", "new2", "bad"]) == [None, None, None, None]


def test_out_of_range_int_in_put_many_is_validation_error(store: ls.Store, kernels: ls.Collection) -> None:
    before = _snapshot(store)
    with pytest.raises(ls.ValidationError, match=r"kernels\.step"):
        kernels.put_many([{"kid": "a", "step": 1}, {"kid": "b", "step": 2**64}, {"kid": "c", "step": 3}])
    assert _snapshot(store) == before


@pytest.mark.parametrize("key", [1, None, b"k1", ["k1"], 1.0], ids=repr)
def test_bad_keys_for_get_and_delete(store: ls.Store, kernels: ls.Collection, key: Any) -> None:
    before = _snapshot(store)
    for call in (kernels.get, kernels.delete, lambda k: kernels.get_many(["k1", k]),
                 lambda k: kernels.delete_many(["k1", k])):
        with pytest.raises(ls.ValidationError, match="kernels"):
            call(key)
    assert _snapshot(store) == before  # delete_many checks every key before deleting any


# -- permissions, closed stores --------------------------------------------------------------------------


def test_store_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "agent.db"
        with ls.open(path) as s:
            s.collection("c", key="k", fields={"k": ls.Text()}).put({"k": "a"})
            files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old_umask)
    assert files == {"agent.db": 0o600, "agent.db-wal": 0o600, "agent.db-shm": 0o600}


def test_existing_store_keeps_private_mode_on_reopen(store_path: Path) -> None:
    _make_store(store_path, rows=1)
    with ls.open(store_path) as s:
        s.collection("items").put({"k": "x"})
        assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{store_path}-wal").st_mode) == 0o600


@pytest.mark.parametrize(
    "operation",
    [
        lambda s, c: c.put({"k": "b"}),
        lambda s, c: c.put_many([{"k": "b"}]),
        lambda s, c: c.get("a"),
        lambda s, c: c.get_many(["a"]),
        lambda s, c: c.delete("a"),
        lambda s, c: c.find(),
        lambda s, c: c.count(),
        lambda s, c: c.keys(),
        lambda s, c: s.collections(),
        lambda s, c: s.collection("other", key="k", fields={"k": ls.Text()}),
        lambda s, c: s.collection("never_opened"),
        lambda s, c: s.transaction().__enter__(),
        lambda s, c: s.changelog.changes(),
        lambda s, c: s.changelog.last_seq(),
        lambda s, c: s.changelog.ack(1),
        lambda s, c: s.changelog.prune(),
        lambda s, c: s.verify(),
        lambda s, c: s.backup(Path(s.path).with_name("copy.db")),
        lambda s, c: s.optimize(),
        lambda s, c: s.expire(),
        lambda s, c: s.stats(),
        lambda s, c: "c" in s,
    ],
    ids=["put", "put_many", "get", "get_many", "delete", "find", "count", "keys", "collections", "declare",
         "reopen-unknown", "transaction", "changes", "last_seq", "ack", "prune", "verify", "backup", "optimize",
         "expire", "stats", "contains"],
)
def test_closed_store_raises_store_closed_error(store_path: Path, operation: Callable[..., Any]) -> None:
    s = ls.open(store_path)
    coll = s.collection("c", key="k", fields={"k": ls.Text()})
    coll.put({"k": "a"})
    s.close()
    s.close()  # closing twice is fine
    assert s.closed
    with pytest.raises(ls.StoreClosedError):
        operation(s, coll)
    assert not Path(s.path).with_name("copy.db").exists()


def test_closed_store_reopen_cached_collection_raises(store_path: Path) -> None:
    s = ls.open(store_path)
    s.collection("c", key="k", fields={"k": ls.Text()})
    s.close()
    with pytest.raises(ls.StoreClosedError):
        s.collection("c")


def test_context_manager_closes_and_close_rolls_back(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = s.collection("c", key="k", fields={"k": ls.Text()})
        coll.put({"k": "kept"})
        tx = s.transaction()
        tx.__enter__()
        coll.put({"k": "uncommitted"})
        s.close()  # inside an open transaction: rolled back
    assert s.closed
    with ls.open(store_path) as again:
        assert again.collection("c").keys() == ["kept"]
        assert again.changelog.last_seq() == 1
        assert again.verify().ok


# -- no raw apsw errors -----------------------------------------------------------------------------------


def _dropped_table_store(path: Path) -> ls.Store:
    _make_store(path, rows=3)
    conn = apsw.Connection(str(path))
    conn.execute("DROP TABLE items")
    conn.close()
    return ls.open(path)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(lambda p: ls.open(p.parent), id="open-directory"),
        pytest.param(lambda p: (p.write_bytes(b"x" * 200), ls.open(p)), id="open-junk"),
        pytest.param(lambda p: _dropped_table_store(p).collection("items"), id="table-dropped-behind-our-back"),
        pytest.param(lambda p: ls.open(p).collection("c", key="k", fields={"k": ls.Text()}).find(where={"k": {"<": None}}),
                     id="query-none-lt"),
        pytest.param(lambda p: ls.open(p).collection("c", key="k", fields={"k": ls.Text()}).get(3), id="get-wrong-key"),
        pytest.param(lambda p: ls.open(p).changelog.ack(5), id="ack-beyond"),
        pytest.param(lambda p: ls.open(p).collection("x", key="k", fields={"k": ls.Text(encrypt=True)}), id="encrypt"),
        pytest.param(lambda p: ls.open(p).collection("sqlite_x", key="k", fields={"k": ls.Text()}), id="reserved-name"),
    ],
)
def test_errors_are_localstore_errors_not_apsw_errors(tmp_path: Path, scenario: Callable[[Path], Any]) -> None:
    with pytest.raises(Exception) as info:
        scenario(tmp_path / "agent.db")
    assert not isinstance(info.value, apsw.Error), repr(info.value)
    assert isinstance(info.value, ls.LocalStoreError), repr(info.value)


def test_file_copy_after_checkpoint_is_a_healthy_store(store_path: Path, tmp_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = s.collection("c", key="k", fields={"k": ls.Text()})
        coll.put_many([{"k": f"k{i}"} for i in range(20)])
        s.optimize()  # checkpoint: the main file now holds everything
        copy = tmp_path / "copy.db"
        shutil.copy(store_path, copy)
    with ls.open(copy) as c:
        assert c.verify().ok
        assert c.collection("c").count() == 20
