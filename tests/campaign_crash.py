"""Crash campaign: SIGKILL a writer process at random moments, N times, in both durability modes.

    .venv/bin/python tests/campaign_crash.py --iterations 1000 [--seed S] [--json] [--dir DIR]

Each iteration starts a writer on a store of its durability mode (iterations alternate
``normal`` and ``full``; each mode keeps a store for 20 of its iterations, so damage would
accumulate, then moves to a fresh one to bound the cost of each check), waits until it is writing, sleeps a random 0-300 ms and SIGKILLs it. The
writer mixes single puts, ``put_many`` of 5 rows, transactions over two collections and
deletes of its own earlier rows, and prints an acknowledgement line after each call
returns. After each kill the parent reopens the store and counts:

- acknowledged writes lost: an acknowledged put missing or with other values, or an
  acknowledged delete whose row is back (must be 0);
- torn writes: a put_many or a transaction only partly present (must be 0);
- integrity errors: ``verify()`` problems (integrity_check, the change log against the rows) (must be 0);
- change-log mismatches: the keys of the log's newest records against the rows present (must be 0).

The run prints the figures (and ``--json`` prints them as JSON). ``tests/test_crash_campaign.py``
runs a short campaign in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
MODES = ("normal", "full")
#: Iterations (both modes together) after which each mode moves on to a fresh store.
STORE_ITERATIONS = 40


def collections(store: Any) -> tuple[Any, Any]:
    import localstore as ls

    a = store.collection("a", key="k", fields={"k": ls.Text(), "it": ls.Integer(), "i": ls.Integer(),
                                                "body": ls.Text(), "blob": ls.Blob()})
    b = store.collection("b", key="k", fields={"k": ls.Text(), "it": ls.Integer(), "twin": ls.Text()})
    return a, b


def row(key: str, it: int, i: int) -> dict[str, Any]:
    return {"k": key, "it": it, "i": i, "body": f"{key}:{it}:{i}", "blob": (i % 251).to_bytes(1, "little") * (100 + i % 900)}


# -- the writer (child process) ------------------------------------------------------------------------


def writer(path: str, durability: str, it: int, seed: int) -> None:
    """Write forever; print ``P k``, ``M k1,k2,...``, ``T ka kb`` or ``D k`` after each call returns."""
    import localstore as ls

    rng = random.Random(seed)
    out = sys.stdout
    store = ls.open(path, durability=durability)
    a, b = collections(store)
    mine: list[str] = []
    out.write("READY\n")
    out.flush()
    i = 0
    while True:
        i += 1
        step = rng.random()
        if step < 0.4:
            key = f"{it}-{i}"
            out.write(f"S P {key}\n")
            out.flush()
            a.put(row(key, it, i))
            out.write(f"P {key}\n")
            mine.append(key)
        elif step < 0.6:
            keys = [f"{it}-{i}-{j}" for j in range(5)]
            out.write(f"S M {','.join(keys)}\n")
            out.flush()
            a.put_many([row(k, it, i) for k in keys])
            out.write(f"M {','.join(keys)}\n")
            mine += keys
        elif step < 0.85:
            ka, kb = f"{it}-{i}-a", f"{it}-{i}-b"
            out.write(f"S T {ka} {kb}\n")
            out.flush()
            with store.transaction():
                a.put(row(ka, it, i))
                b.put({"k": kb, "it": it, "twin": ka})
            out.write(f"T {ka} {kb}\n")
            mine.append(ka)
        elif mine:
            key = mine.pop(rng.randrange(len(mine)))
            out.write(f"S D {key}\n")
            out.flush()
            a.delete(key)
            out.write(f"D {key}\n")
        out.flush()


# -- the parent ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    iterations: int = 0
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    acknowledged_writes: int = 0
    acknowledged_lost: int = 0
    torn_writes: int = 0
    integrity_errors: int = 0
    changelog_mismatches: int = 0
    in_flight_committed: int = 0  # the call in flight at the kill had committed (allowed)
    rows_checked: int = 0
    seconds: float = 0.0
    seed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.acknowledged_lost or self.torn_writes or self.integrity_errors or self.changelog_mismatches)


@dataclass
class Expect:
    """What the parent knows must hold, per mode, across iterations."""

    present: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (it, i) acknowledged
    deleted: set[str] = field(default_factory=set)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)


def parse(text: str, it: int, exp: Expect) -> tuple[int, list[str]]:
    """Apply the child's acknowledgements to ``exp``; return (acks, keys of the call in flight)."""
    lines = text.split("\n")[:-1]  # the last piece may be cut by the kill
    acks = 0
    in_flight: list[str] = []
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "S":
            in_flight = [k for part in rest.split(" ")[1:] for k in part.split(",")]
            if rest.startswith("M "):
                exp.batches.append(rest[2:].split(","))
            elif rest.startswith("T "):
                exp.pairs.append(tuple(rest[2:].split(" ")))  # type: ignore[arg-type]
            continue
        if kind == "P":
            exp.present[rest] = (it, int(rest.split("-")[1]))
        elif kind == "M":
            for k in rest.split(","):
                exp.present[k] = (it, int(k.split("-")[1]))
        elif kind == "T":
            ka = rest.split(" ")[0]
            exp.present[ka] = (it, int(ka.split("-")[1]))
        elif kind == "D":
            exp.present.pop(rest, None)
            exp.deleted.add(rest)
        else:
            continue
        acks += 1
        in_flight = []
    return acks, in_flight


def check(path: Path, exp: Expect, in_flight: list[str], fig: Figures, where: str) -> None:
    import localstore as ls

    with ls.open(path) as store:
        a, b = collections(store)
        rows = {r["k"]: r for r in a.find()}
        twins = {r["k"]: r for r in b.find()}
        fig.rows_checked += len(rows)
        for key, (it, i) in exp.present.items():
            got = rows.get(key)
            if got is None or got != row(key, it, i):
                if key in in_flight:
                    continue  # an acknowledged put overwritten by nothing: cannot happen, but a delete in flight may remove it
                fig.acknowledged_lost += 1
                fig.failures.append(f"{where}: acknowledged put {key} lost or changed: {got}")
        for key in exp.deleted:
            if key in rows and key not in in_flight:
                fig.acknowledged_lost += 1
                fig.failures.append(f"{where}: acknowledged delete of {key} undone")
        gone = exp.deleted | set(in_flight)  # deleted since, or by the call in flight
        for batch in exp.batches:
            n = sum(k in rows or k in gone for k in batch)
            if n not in (0, len(batch)):
                fig.torn_writes += 1
                fig.failures.append(f"{where}: put_many {batch[0]}.. {n} of {len(batch)} rows present")
        for ka, kb in exp.pairs:
            # ka may be deleted later, by an acknowledged delete or the delete in flight; kb never is.
            excused = ka in exp.deleted or (ka in in_flight and kb not in in_flight)
            if (ka in rows and kb not in twins) or (kb in twins and ka not in rows and not excused):
                fig.torn_writes += 1
                fig.failures.append(f"{where}: transaction {ka}/{kb} half present")
        # The call in flight committed (present) or not (absent); either is fine, but remember it.
        if in_flight and all(k in rows or k in twins for k in in_flight if not k.endswith("-b")):
            fig.in_flight_committed += 1
        report = store.verify()
        if not report.ok:
            fig.integrity_errors += len(report.problems)
            fig.failures.append(f"{where}: verify: {report.problems[:3]}")
        # The change log's newest record per key agrees with the rows (verify checks seqs; this checks keys).
        newest: dict[tuple[str, str], str] = {}
        after = 0
        while True:
            batch = store.changelog.changes(after, limit=5000)
            if not batch:
                break
            for c in batch:
                newest[(c.collection, str(c.key))] = c.op
            after = batch[-1].seq
        live = {("a", k) for k in rows} | {("b", k) for k in twins}
        logged = {k for k, op in newest.items() if op == "put"}
        if live != logged:
            fig.changelog_mismatches += len(live ^ logged)
            fig.failures.append(f"{where}: change log and rows disagree on {sorted(live ^ logged)[:5]}")
    # Bring the expectation in line with what the in-flight call did.
    for k in in_flight:
        if k in rows and k not in exp.present and k not in exp.deleted:
            exp.present[k] = (rows[k]["it"], rows[k]["i"])
        if k in exp.present and k not in rows:
            exp.present.pop(k)
            exp.deleted.add(k)


def run_campaign(iterations: int, folder: Path, seed: int | None = None, max_delay: float = 0.3,
                 progress: bool = False) -> Figures:
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    fig = Figures()
    start = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    folder.mkdir(parents=True, exist_ok=True)
    expects: dict[Path, Expect] = {}
    for it in range(iterations):
        mode = MODES[it % 2]
        # A fresh store per mode every ``STORE_ITERATIONS`` iterations keeps each check's cost bounded.
        path = folder / f"crash-{mode}-{it // STORE_ITERATIONS}.db"
        out = folder / "child.out"
        with out.open("w") as fout:
            proc = subprocess.Popen([sys.executable, str(HERE), "--child", str(path), mode, str(it), str(rng.randrange(2**32))],
                                    stdout=fout, stderr=subprocess.PIPE, env=env, text=True)
        try:
            deadline = time.monotonic() + 60
            while "READY\n" not in out.read_text():
                if proc.poll() is not None:
                    raise RuntimeError(f"writer exited early: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
                if time.monotonic() > deadline:
                    raise RuntimeError("writer never became ready")
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, max_delay))
            if proc.poll() is not None:
                raise RuntimeError(f"writer died on its own: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        fig.kills[mode] += 1
        exp = expects.setdefault(path, Expect())
        acks, in_flight = parse(out.read_text(), it, exp)
        fig.acknowledged_writes += acks
        check(path, exp, in_flight, fig, f"seed {seed} iteration {it} ({mode})")
        fig.iterations += 1
        if progress and (it + 1) % 50 == 0:
            print(f"{it + 1}/{iterations} iterations, {fig.acknowledged_writes} acknowledged writes, "
                  f"{fig.acknowledged_lost} lost", file=sys.stderr)
    fig.seconds = round(time.monotonic() - start, 1)
    fig.seed = seed
    return fig


# -- sync kills -------------------------------------------------------------------------------------


@dataclass
class SyncFigures:
    kills_mid_batch: int = 0
    kills_in_window: int = 0  # Postgres had committed a batch whose watermark write had not happened
    window_gap_changes: int = 0  # changes committed centrally but not acknowledged locally, summed over window kills
    resyncs: int = 0
    not_converged: int = 0  # central differs from local after the resync (must be 0)
    integrity_errors: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.not_converged or self.integrity_errors or self.failures)


def _sync_write(store: Any, rng: random.Random, count: int) -> None:
    import localstore as ls

    coll = store.collection("events", key="id", fields={"id": ls.Text(), "n": ls.Integer(), "phi": ls.Real(),
                                                      "meta": ls.Json()})
    keys = rng.sample(range(3 * count), count)
    coll.put_many([{"id": f"e{k}", "n": i, "phi": rng.random(), "meta": {"i": i}} for i, k in enumerate(keys)])
    coll.delete_many([f"e{rng.randrange(3 * count)}" for _ in range(count // 20)])


def _central_last_seq(url: str, schema: str, store_id: str) -> int:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url) as conn:
        row = conn.execute(sql.SQL("SELECT last_seq FROM {} WHERE store_id = %s").format(
            sql.Identifier(schema, "stores")), (store_id,)).fetchone()
    return int(row[0]) if row else 0


def run_sync_campaign(kills: int, folder: Path, url: str, schema: str, seed: int | None = None) -> SyncFigures:
    """SIGKILL ``localstore sync once`` ``kills`` times: alternately at a random moment mid-batch, and in the
    window after Postgres committed a batch but before the store's watermark moved.

    The window is made, without touching the engine, by holding one store's SQLite write lock: the
    daemon ships and commits a batch to Postgres, then waits on the lock to write the watermark; the
    kill lands while Postgres' ``last_seq`` is ahead of the watermark. After each kill a full resync
    runs and central must equal local (``_sync_workers.assert_converged``).
    """
    import apsw
    from _sync_workers import assert_converged

    import localstore as ls

    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    fig = SyncFigures()
    start = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE.parent), env.get("PYTHONPATH", "")])
    ws = ls.Workspace(folder / "sync-ws")
    stores = [ws.open(f"s{i}") for i in range(2)]
    cmd = [sys.executable, "-m", "localstore", "sync", "once", ws.path, "--url", url, "--schema", schema,
           "--batch-rows", "100", "--quiet"]
    try:
        for k in range(kills):
            window = k % 2 == 1
            where = f"seed {seed} sync kill {k} ({'window' if window else 'mid-batch'})"
            for s in stores:
                _sync_write(s, rng, 600)
            target = rng.choice(stores)
            lock = None
            if window:
                lock = apsw.Connection(target.path)
                lock.set_busy_timeout(10_000)
                lock.execute("BEGIN IMMEDIATE")
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 60
                if window:
                    mark = target.changelog.watermark()
                    while _central_last_seq(url, schema, target.id) <= mark:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"{where}: no batch reached Postgres while the watermark was held")
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0, 0.05))
                else:
                    marks = [s.changelog.watermark() for s in stores]
                    while [s.changelog.watermark() for s in stores] == marks and proc.poll() is None:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{where}: nothing shipped")
                        time.sleep(0.002)
                    time.sleep(rng.uniform(0, 0.1))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if lock is not None:
                    lock.execute("ROLLBACK")
                    lock.close()
                err = proc.stderr.read().decode() if proc.stderr else ""
                if proc.stderr:
                    proc.stderr.close()
            if proc.returncode == -signal.SIGKILL:
                if window:
                    gap = _central_last_seq(url, schema, target.id) - target.changelog.watermark()
                    if gap <= 0:
                        fig.failures.append(f"{where}: the kill missed the window (gap {gap})")
                    fig.kills_in_window += 1
                    fig.window_gap_changes += max(gap, 0)
                else:
                    fig.kills_mid_batch += 1
            elif proc.returncode != 0:
                fig.failures.append(f"{where}: sync exited {proc.returncode}: {err[-500:]}")
            final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
            fig.resyncs += 1
            if final.returncode != 0:
                fig.failures.append(f"{where}: the resync failed: {final.stderr[-500:]}")
                continue
            for s in stores:
                try:
                    assert_converged(url, schema, s)
                except AssertionError as exc:
                    fig.not_converged += 1
                    fig.failures.append(f"{where}: {s.name} central != local: {str(exc)[:300]}")
                report = s.verify()
                if not report.ok:
                    fig.integrity_errors += len(report.problems)
                    fig.failures.append(f"{where}: {s.name}: {report.problems[:3]}")
    finally:
        ws.close()
    fig.seconds = round(time.monotonic() - start, 1)
    return fig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        writer(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", "-n", type=int, default=100)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dir", type=Path, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sync-kills", type=int, default=0,
                        help="also SIGKILL the sync daemon this many times (half in the commit/watermark window)")
    parser.add_argument("--url", help="Postgres for --sync-kills (default: $LOCALSTORE_POSTGRES_URL, else an embedded one)")
    parser.add_argument("--schema", default="crash_campaign")
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="crash-campaign-"))
    fig = run_campaign(args.iterations, folder, args.seed, progress=not args.json)
    sync_fig = None
    if args.sync_kills:
        import contextlib

        url = args.url or os.environ.get("LOCALSTORE_POSTGRES_URL")
        with contextlib.ExitStack() as stack:
            if not url:
                from localstore.sync.embedded import postgres_url

                url = stack.enter_context(postgres_url())
            sync_fig = run_sync_campaign(args.sync_kills, folder, url, args.schema, args.seed)
    ok = fig.ok and (sync_fig is None or sync_fig.ok)
    if args.json:
        print(json.dumps({**asdict(fig), "ok": fig.ok, "sync": asdict(sync_fig) if sync_fig else None}, indent=2))
    else:
        print(f"iterations {fig.iterations} (SIGKILL: normal {fig.kills['normal']}, full {fig.kills['full']}) in {fig.seconds}s")
        print(f"acknowledged writes {fig.acknowledged_writes}, lost {fig.acknowledged_lost}, torn {fig.torn_writes}, "
              f"integrity errors {fig.integrity_errors}, change-log mismatches {fig.changelog_mismatches}, "
              f"in-flight call committed {fig.in_flight_committed}")
        for line in fig.failures[:20]:
            print("  " + line)
        if sync_fig is not None:
            print(f"sync kills: mid-batch {sync_fig.kills_mid_batch}, in the commit/watermark window "
                  f"{sync_fig.kills_in_window} ({sync_fig.window_gap_changes} changes committed but unacknowledged), "
                  f"resyncs {sync_fig.resyncs}, not converged {sync_fig.not_converged}, "
                  f"integrity errors {sync_fig.integrity_errors} in {sync_fig.seconds}s")
            for line in sync_fig.failures[:20]:
                print("  " + line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
