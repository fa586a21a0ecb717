"""Store writes, reads and opens: localstore against raw apsw and sqlite-utils, side by side.

Every figure is a ratio against a baseline timed in the same run, except the
open times, which have absolute targets. Each timed run gets a fresh file in a
temporary folder; set-up (creating the file, declaring the collection) and
closing are not timed.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import apsw
from _harness import Case, Figure, Report, Scratch, english_text, is_tiny, log, measure, time_once

import localstore as ls
from localstore._sqlite import DEFAULT_CACHE_KIB, connect

HAVE_SQLITE_UTILS = importlib.util.find_spec("sqlite_utils") is not None

COLLECTION = "memories"
KINDS = ("observation", "observation", "observation", "reflection", "plan", "dialogue", "fact")

FIELDS: dict[str, Any] = {
    "id": ls.Text(),
    "text": ls.Text(),
    "importance": ls.Real(),
    "kind": ls.Text(),
    "ts": ls.Integer(),
}

#: The plain-table equivalent of ``FIELDS`` for the apsw and sqlite-utils baselines.
PLAIN_DDL = (
    f"CREATE TABLE {COLLECTION}(id TEXT PRIMARY KEY NOT NULL, text TEXT, importance REAL,"
    " kind TEXT, ts INTEGER) STRICT"
)
PLAIN_INSERT = (
    f"INSERT INTO {COLLECTION}(id, text, importance, kind, ts)"
    " VALUES(:id, :text, :importance, :kind, :ts)"
)
PLAIN_SELECT = f"SELECT id, text, importance, kind, ts FROM {COLLECTION} WHERE id = ?"


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``QUICK`` runs in a few seconds."""

    rows: int  # rows per put_many
    repeat: int  # timed runs per put_many case
    singles: int  # puts and gets per single-row run
    single_repeat: int
    opens: int  # timed opens of one store
    stores: int  # stores in the workspace
    workspace_repeat: int
    text_bytes: int = 500


FULL = Sizes(
    rows=100_000,
    repeat=5,
    singles=5_000,
    single_repeat=5,
    opens=200,
    stores=1_000,
    workspace_repeat=3,
)
QUICK = Sizes(
    rows=10_000, repeat=3, singles=1_000, single_repeat=3, opens=50, stores=100, workspace_repeat=3
)
#: ``LOCALSTORE_BENCH_TINY=1`` (smoke tests): every section runs, on sizes too small to mean anything.
TINY = Sizes(rows=500, repeat=1, singles=50, single_repeat=1, opens=5, stores=5, workspace_repeat=1)


# -- data ------------------------------------------------------------------------------


def make_rows(count: int, *, text_bytes: int = 500, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` memory-like rows: a UUID key, ~``text_bytes`` of English, and a few scalars."""
    rng = random.Random(seed)
    base_ts = 1_700_000_000_000
    rows = []
    for i in range(count):
        text = english_text(rng, text_bytes)
        rows.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "text": text,
                "importance": round(rng.random(), 4),
                "kind": rng.choice(KINDS),
                "ts": base_ts + i * 1_000 + rng.randrange(1_000),
            }
        )
    return rows


# -- contenders ---------------------------------------------------------------------------


def new_collection(path: str, *, sync: bool = True) -> tuple[ls.Store, ls.Collection]:
    """A new store at ``path`` with the memories collection declared."""
    store = ls.open(path)
    return store, store.collection(COLLECTION, key="id", fields=FIELDS, sync=sync)


def new_plain(path: str) -> apsw.Connection:
    """An apsw connection set up exactly as localstore's, with the plain memories table."""
    conn = connect(path)
    conn.execute(PLAIN_DDL)
    return conn


def new_sqlite_utils(path: str) -> Any:
    """A sqlite-utils database with localstore's pragmas and the plain memories table."""
    import sqlite_utils

    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL").fetchall()
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA cache_size=-{DEFAULT_CACHE_KIB}")
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute(PLAIN_DDL)
    return db


def apsw_insert_all(conn: apsw.Connection, rows: list[dict[str, Any]]) -> None:
    """The raw baseline: one ``executemany`` of the same dicts (named bindings), one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(PLAIN_INSERT, rows)
    conn.execute("COMMIT")


def sqlite_utils_insert_all(db: Any, rows: list[dict[str, Any]]) -> None:
    """sqlite-utils ``insert_all`` in one transaction (its batch commits become savepoints)."""
    with db.atomic():
        db[COLLECTION].insert_all(rows, batch_size=100_000)


# -- sections -------------------------------------------------------------------------------


def bench_put_many(
    report: Report, scratch: Scratch, rows: list[dict[str, Any]], sizes: Sizes
) -> None:
    """put_many against raw apsw and sqlite-utils, and with the change log on and off."""
    n = len(rows)

    def ours_case(name: str, label: str, sync: bool) -> Case:
        def setup() -> tuple[str, ls.Store, ls.Collection]:
            path = scratch.path(name)
            return (path, *new_collection(path, sync=sync))

        def teardown(state: tuple[str, ls.Store, ls.Collection]) -> None:
            state[1].close()
            scratch.remove(state[0])

        return Case(
            name, lambda s: s[2].put_many(rows), setup, teardown, items=n, unit="row", label=label
        )

    def plain_setup() -> tuple[str, apsw.Connection]:
        path = scratch.path("apsw")
        return path, new_plain(path)

    def plain_teardown(state: tuple[str, apsw.Connection]) -> None:
        state[1].close()
        scratch.remove(state[0])

    def su_setup() -> tuple[str, Any]:
        path = scratch.path("sqlite-utils")
        return path, new_sqlite_utils(path)

    def su_teardown(state: tuple[str, Any]) -> None:
        state[1].close()
        scratch.remove(state[0])

    cases = [
        ours_case("put_many.localstore", "put_many  localstore (sync=True)", True),
        ours_case("put_many.localstore_nosync", "put_many  localstore (sync=False)", False),
        Case(
            "put_many.apsw",
            lambda s: apsw_insert_all(s[1], rows),
            plain_setup,
            plain_teardown,
            items=n,
            unit="row",
            label="put_many  raw apsw executemany",
        ),
    ]
    if HAVE_SQLITE_UTILS:
        cases.append(
            Case(
                "put_many.sqlite_utils",
                lambda s: sqlite_utils_insert_all(s[1], rows),
                su_setup,
                su_teardown,
                items=n,
                unit="row",
                label="put_many  sqlite-utils insert_all",
            )
        )
    else:
        report.notes.append(
            "sqlite-utils is not installed (pip install -e '.[bench]'); its baseline was skipped"
        )
    report.add(
        *measure(
            cases, sizes.repeat, warmup=1 if not report.quick else 0, progress=f"put_many x{n:,}"
        )
    )
    report.speed_ratio(
        "put_many.vs_apsw",
        "put_many: localstore / raw apsw (rows/s)",
        "put_many.localstore",
        "put_many.apsw",
        target_op=">=",
        target=0.6,
    )
    if HAVE_SQLITE_UTILS:
        report.speed_ratio(
            "put_many.vs_sqlite_utils",
            "put_many: localstore / sqlite-utils (rows/s)",
            "put_many.localstore",
            "put_many.sqlite_utils",
        )
    report.cost_ratio(
        "changelog.cost",
        "change log: time sync=True / sync=False",
        "put_many.localstore",
        "put_many.localstore_nosync",
        target_op="<=",
        target=1.5,
    )


def bench_single(
    report: Report, scratch: Scratch, rows: list[dict[str, Any]], sizes: Sizes
) -> None:
    """One row per call: put (each its own transaction) and get by key, against raw apsw."""
    batch = rows[: sizes.singles]

    def ours_setup() -> tuple[str, ls.Store, ls.Collection]:
        path = scratch.path("put")
        return (path, *new_collection(path))

    def ours_teardown(state: tuple[str, ls.Store, ls.Collection]) -> None:
        state[1].close()
        scratch.remove(state[0])

    def ours_put(state: tuple[str, ls.Store, ls.Collection]) -> None:
        put = state[2].put
        for row in batch:
            put(row)

    def plain_setup() -> tuple[str, apsw.Connection]:
        path = scratch.path("put-apsw")
        return path, new_plain(path)

    def plain_teardown(state: tuple[str, apsw.Connection]) -> None:
        state[1].close()
        scratch.remove(state[0])

    def plain_put(state: tuple[str, apsw.Connection]) -> None:
        execute = state[1].execute
        for row in batch:
            execute(PLAIN_INSERT, row)  # autocommit: one transaction per row, as put()

    report.add(
        *measure(
            [
                Case(
                    "put.localstore",
                    ours_put,
                    ours_setup,
                    ours_teardown,
                    items=len(batch),
                    unit="row",
                    label="put       localstore, one row per call",
                ),
                Case(
                    "put.apsw",
                    plain_put,
                    plain_setup,
                    plain_teardown,
                    items=len(batch),
                    unit="row",
                    label="put       raw apsw INSERT autocommit",
                ),
            ],
            sizes.single_repeat,
            progress=f"put x{len(batch):,}",
        )
    )
    report.speed_ratio(
        "put.vs_apsw", "put: localstore / raw apsw (rows/s)", "put.localstore", "put.apsw"
    )

    # get: one store and one plain table filled once, then random keys read one at a time.
    keys = [row["id"] for row in random.Random(11).sample(rows, min(sizes.singles, len(rows)))]
    ours_path, plain_path = scratch.path("get"), scratch.path("get-apsw")
    store, coll = new_collection(ours_path)
    conn = new_plain(plain_path)
    try:
        coll.put_many(rows)
        apsw_insert_all(conn, rows)

        def ours_get(_: None) -> None:
            get = coll.get
            for key in keys:
                if get(key) is None:
                    raise AssertionError(f"localstore lost row {key}")

        def plain_get(_: None) -> None:
            execute = conn.execute
            for key in keys:
                if execute(PLAIN_SELECT, (key,)).fetchone() is None:
                    raise AssertionError(f"apsw lost row {key}")

        report.add(
            *measure(
                [
                    Case(
                        "get.localstore",
                        ours_get,
                        items=len(keys),
                        unit="row",
                        label="get       localstore, by key",
                    ),
                    Case(
                        "get.apsw",
                        plain_get,
                        items=len(keys),
                        unit="row",
                        label="get       raw apsw SELECT by key",
                    ),
                ],
                sizes.single_repeat,
                warmup=1,
                progress=f"get x{len(keys):,}",
            )
        )
    finally:
        store.close()
        conn.close()
        scratch.remove(ours_path)
        scratch.remove(plain_path)
    report.speed_ratio(
        "get.vs_apsw", "get: localstore / raw apsw (rows/s)", "get.localstore", "get.apsw"
    )


def bench_open(report: Report, scratch: Scratch, rows: list[dict[str, Any]], sizes: Sizes) -> None:
    """Open one existing store and its collection; bare apsw and ``connect`` as baselines."""
    path = scratch.path("open")
    store, coll = new_collection(path)
    coll.put_many(rows[:1_000])
    store.close()

    def ours() -> ls.Store:
        opened = ls.open(path)
        opened.collection(COLLECTION)
        return opened

    def bare() -> apsw.Connection:
        conn = apsw.Connection(path)
        # Read the schema, as any first query does.
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        return conn

    def close_all(held: list[ls.Store | apsw.Connection]) -> None:
        for handle in held:
            handle.close()

    def opening(name: str, label: str, opener: Callable[[], ls.Store | apsw.Connection]) -> Case:
        """A case that times ``opener()`` and closes what it opened, untimed."""
        return Case(
            name, lambda held: held.append(opener()), setup=list, teardown=close_all, label=label
        )

    cases = [
        opening("open.localstore", "open      localstore.open + store.collection(name)", ours),
        opening(
            "open.connect",
            "open      localstore._sqlite.connect (set-up only)",
            lambda: connect(path),
        ),
        opening("open.apsw", "open      bare apsw.Connection + first query", bare),
    ]
    report.add(*measure(cases, sizes.opens, warmup=3, progress=f"open x{sizes.opens}"))
    scratch.remove(path)
    t = report.timings["open.localstore"]
    report.figure(
        Figure(
            "open.ms", "open one store + its collection (median)", t.median * 1e3, "ms", "<", 5.0
        )
    )
    share = report.timings["open.connect"].median / t.median * 100
    report.figure(
        Figure(
            "open.connect_share", "open: share of the time spent in connect() set-up", share, "%"
        )
    )
    report.cost_ratio(
        "open.vs_apsw", "open: localstore / bare apsw (time)", "open.localstore", "open.apsw"
    )


def bench_open_after_crash(report: Report, scratch: Scratch, rows: list[dict[str, Any]], sizes: Sizes) -> None:
    """Open a store a crash left with a ~4 MB WAL: ``ls.open`` checks the WAL first (localstore.walcheck).

    The baseline is a bare apsw open and first query of the same files, which runs
    SQLite's own WAL recovery; both start from a fresh copy of the crash-time files.
    """
    path = scratch.path("crashed")
    store, coll = new_collection(path)
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    chunk = max(1, len(rows) // 10)
    while os.path.getsize(f"{path}-wal") < 4_000_000:  # what a crash leaves: committed frames only in the WAL
        coll.put_many([dict(r, id=f"{r['id']}-{uuid.uuid4().hex[:6]}") for r in rows[:chunk]])
    files = {s: open(f"{path}{s}", "rb").read() for s in ("", "-wal", "-shm")}  # noqa: SIM115
    wal_mb = len(files["-wal"]) / 1e6
    store.close()

    def restore() -> list[Any]:
        for suffix, data in files.items():
            with open(f"{path}{suffix}", "wb") as handle:
                handle.write(data)
        return []

    def close_all(held: list[Any]) -> None:
        for handle in held:
            handle.close()

    def bare(held: list[Any]) -> None:
        conn = apsw.Connection(path)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        held.append(conn)

    cases = [
        Case("open_crashed.localstore", lambda held: held.append(ls.open(path)), setup=restore, teardown=close_all,
             label=f"open after a crash ({wal_mb:.1f} MB WAL): localstore.open, WAL checked first"),
        Case("open_crashed.apsw", bare, setup=restore, teardown=close_all,
             label=f"open after a crash ({wal_mb:.1f} MB WAL): bare apsw + first query (SQLite's recovery)"),
    ]
    report.add(*measure(cases, max(3, sizes.opens // 20), warmup=1, progress="open after a crash"))
    scratch.remove(path)
    report.cost_ratio("open_crashed.vs_apsw", f"open after a crash, {wal_mb:.1f} MB WAL: localstore / bare apsw (time)",
                      "open_crashed.localstore", "open_crashed.apsw")


def bench_workspace(report: Report, root: str, sizes: Sizes) -> None:
    """A workspace of many stores: list names, and open then close every store."""
    folder = os.path.join(root, "workspace")
    names = [f"agent-{i:04d}" for i in range(sizes.stores)]

    def create_all() -> None:
        with ls.Workspace(folder) as ws:
            for name in names:
                store = ws.open(name)
                store.collection(COLLECTION, key="id", fields=FIELDS).put(
                    {"id": "m0", "text": "hello", "importance": 0.5, "kind": "fact", "ts": 0}
                )
                store.close()

    log(f"workspace: creating {sizes.stores:,} stores")
    created = time_once(create_all)
    report.params["workspace_create_s"] = round(created, 3)

    def list_names(_: None) -> None:
        found = ls.Workspace(folder, create=False).names()
        if len(found) != len(names):
            raise AssertionError(f"workspace lists {len(found)} stores, expected {len(names)}")

    def open_all(_: None) -> None:
        ws = ls.Workspace(folder, create=False)
        for name in ws.names():
            ws.open(name).close()

    report.add(
        *measure(
            [
                Case(
                    "workspace.names",
                    list_names,
                    label=f"workspace Workspace() + names() over {len(names):,} stores",
                ),
            ],
            20,
            warmup=1,
        )
    )
    report.add(
        *measure(
            [
                Case(
                    "workspace.open_all",
                    open_all,
                    items=len(names),
                    unit="store",
                    label=f"workspace open + close all {len(names):,} stores",
                ),
            ],
            sizes.workspace_repeat,
            warmup=1,
            progress=f"workspace open all {len(names):,}",
        )
    )
    shutil.rmtree(folder, ignore_errors=True)
    report.figure(
        Figure(
            "workspace.names_ms",
            f"workspace names() of {len(names):,} stores",
            report.timings["workspace.names"].median * 1e3,
            "ms",
        )
    )
    report.figure(
        Figure(
            "workspace.open_ms",
            "workspace open + close, per store",
            report.timings["workspace.open_all"].per_item * 1e3,
            "ms",
        )
    )
    report.figure(
        Figure(
            "workspace.create_ms",
            "workspace create store + collection + 1 put, per store (1 run)",
            created / len(names) * 1e3,
            "ms",
        )
    )


# -- entry point ------------------------------------------------------------------------------


def run(quick: bool = False) -> Report:
    """Run the store benchmark; ``quick`` shrinks every size so it finishes in a few seconds."""
    sizes = TINY if is_tiny() else QUICK if quick else FULL
    report = Report("store", quick, params={k: v for k, v in asdict(sizes).items()})
    started = time.perf_counter()
    log(f"store: making {sizes.rows:,} rows of docstring text")
    rows = make_rows(sizes.rows, text_bytes=sizes.text_bytes)
    report.params["mean_text_bytes"] = round(sum(len(r["text"].encode()) for r in rows) / len(rows))
    with tempfile.TemporaryDirectory(prefix="localstore-bench-") as root:
        report.params["folder"] = os.path.dirname(root)
        scratch = Scratch(root)
        bench_put_many(report, scratch, rows, sizes)
        bench_single(report, scratch, rows, sizes)
        bench_open(report, scratch, rows, sizes)
        bench_open_after_crash(report, scratch, rows, sizes)
        bench_workspace(report, root, sizes)
    report.notes += [
        (
            "ratios compare per-row median times of runs interleaved in this process; same pragmas "
            "for all (WAL, synchronous=NORMAL, cache_size, temp_store); sqlite-utils runs on the "
            "stdlib sqlite3 build"
        ),
        "targets are informational; a MISS does not fail the run",
    ]
    report.elapsed_s = time.perf_counter() - started
    return report
