"""The ``localstore`` command: inspect, query, back up and verify stores.

Every subcommand has an example in its ``--help``; ``--json`` gives machine-
readable output where it makes sense. Errors print one line to stderr and exit 1
(2 for usage errors).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import apsw
import numpy as np

from . import __version__
from ._sqlite import translate
from .errors import LocalStoreError, QueryError, StoreOpenError
from .keys import FORGOTTEN
from .store import Store

EXAMPLES = {
    "info": "Example:\n  localstore info data/kernel-7.db\n  localstore info data/kernel-7.db --json",
    "stats": "Example:\n  localstore stats data/kernel-7.db\n  localstore stats data/*.db --json",
    "query": (
        "Examples:\n"
        "  localstore query data/kernel-7.db kernels --where '{\"phi\": {\">\": 0.7}}' --order-by=-phi --limit 5\n"
        "  localstore query data/kernel-7.db --sql 'SELECT regime, count(*) FROM kernels GROUP BY regime'"
    ),
    "backup": "Example:\n  localstore backup data/kernel-7.db backups/kernel-7-$(date +%F).db",
    "verify": "Example:\n  localstore verify data/kernel-7.db && echo healthy",
    "optimize": "Example:\n  localstore optimize data/kernel-7.db --vacuum",
    "expire": "Example:\n  localstore expire data/kernel-7.db",
    "checksums": ("Examples:\n  localstore checksums data/kernel-7.db\n"
                  "  localstore checksums --convert data/old.db      # a store made before checksums were the default\n"
                  "  localstore checksums --refresh data/kernel-7.db # after a deliberate edit with the sqlite3 shell"),
}


def _jsonable(value: Any) -> Any:
    if value is FORGOTTEN:
        return {"forgotten": True}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _open(path: str) -> Store:
    return Store(path, create=False)


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.path) as store:
        st = store.stats()
        out: dict[str, Any] = {
            "path": store.path,
            "store_id": store.id,
            "collections": {n: {"key": c["key"], "fields": c["fields"], "sync": c["sync"], "ttl": c["ttl"]}
                            for n, c in st.collections.items()},
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"store     {out['path']}")
    print(f"id        {out['store_id']}")
    for name, c in out["collections"].items():
        extras = [] if c["sync"] else ["sync=False"]
        if c["ttl"]:
            extras.append(f"ttl={c['ttl']:g}s")
        print(f"\ncollection {name} (key {c['key']}{', ' + ', '.join(extras) if extras else ''})")
        for fname, desc in c["fields"].items():
            print(f"  {fname:<24} {desc}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    results = []
    for path in args.paths:
        with _open(path) as store:
            results.append(store.stats().as_dict())
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for st in results:
        print(f"{st['path']}  id {st['store_id']}")
        print(f"  file {_human_bytes(st['file_bytes'])}, wal {_human_bytes(st['wal_bytes'])}")
        print(f"  changes: last seq {st['last_seq']}, acknowledged {st['watermark']}, "
              f"pending {st['pending_changes']}, kept history {st['history_changes']}")
        for name, c in st["collections"].items():
            print(f"  {name:<24} {c['rows']:>10} rows  {_human_bytes(c['bytes']):>10}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    if args.sql:
        if args.collection:
            raise QueryError("give either a collection or --sql, not both")
        rows = _sql_query(args.path, args.sql)
    else:
        if not args.collection:
            raise QueryError("give a collection name, or --sql 'SELECT ...'")
        try:
            where = json.loads(args.where) if args.where else None
        except json.JSONDecodeError as exc:
            raise QueryError(f"--where is not valid JSON ({exc}); example: --where '{{\"phi\": {{\">\": 0.7}}}}'") from None
        with _open(args.path) as store:
            rows = store.collection(args.collection).find(where=where, order_by=args.order_by, limit=args.limit)
    rows = [_jsonable(r) for r in rows]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=sys.stderr)
    return 0


def _sql_query(path: str, sql: str) -> list[dict[str, Any]]:
    """Run one SQL statement on a read-only connection, so a query can never change the store."""
    with _open(path):
        pass  # validates that the path is a store, with clear errors
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        cursor = conn.execute(sql)
        names = [d[0] for d in cursor.getdescription()] if cursor.is_readonly else []
        return [dict(zip(names, row)) for row in cursor]
    except apsw.ExecutionCompleteError:
        return []
    except apsw.ReadOnlyError:
        raise QueryError("localstore query --sql is read-only; write through the Python API") from None
    except apsw.SQLError as exc:
        raise QueryError(f"SQL error: {exc}") from None
    except apsw.Error as exc:
        raise translate(exc, path, "querying") from None
    finally:
        conn.close()


def cmd_backup(args: argparse.Namespace) -> int:
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not args.quiet and sys.stderr.isatty():
            print(f"\rcopying pages {done}/{total}", end="", file=sys.stderr, flush=True)

    with _open(args.path) as store:
        store.backup(args.dest, progress=progress)
    if not args.quiet:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(f"backed up {args.path} -> {args.dest} in {time.perf_counter() - started:.2f}s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ok = True
    reports = []
    for path in args.paths:
        with _open(path) as store:
            report = store.verify()
        ok = ok and report.ok
        reports.append(report)
    if args.json:
        data = [r.as_dict() for r in reports]
        print(json.dumps(data if len(data) > 1 else data[0], indent=2))
    else:
        for report in reports:
            print(report)
    return 0 if ok else 1


def cmd_optimize(args: argparse.Namespace) -> int:
    with _open(args.path) as store:
        before = store.stats().file_bytes
        if args.rewrite_unchecked:
            from .codecs import rewrite_unchecked

            print(f"rewrote {rewrite_unchecked(store, batch=1000)} rows into checksummed value forms")
        done = store.optimize(vacuum=True if args.vacuum else None)
        after = store.stats().file_bytes
    rebuilt = f", rebuilt vector indexes of {', '.join(done['rebuilt_indexes'])}" if done["rebuilt_indexes"] else ""
    vacuumed = ", vacuumed" if done["vacuumed"] else ""
    print(f"optimized {args.path}: {_human_bytes(before)} -> {_human_bytes(after)}{rebuilt}{vacuumed}")
    return 0


def cmd_expire(args: argparse.Namespace) -> int:
    with _open(args.path) as store:
        counts = store.expire()
    if args.json:
        print(json.dumps(counts))
    else:
        for name, n in counts.items():
            print(f"{name}: {n} expired rows deleted")
        if not counts:
            print("no collection has a ttl")
    return 0


def cmd_checksums(args: argparse.Namespace) -> int:
    from . import checksums

    if not os.path.isfile(args.path):
        raise StoreOpenError(f"no store at {args.path}")
    if args.convert:
        checksums.convert(args.path)
    elif args.refresh:
        checksums.refresh(args.path)
    on = checksums.enabled(args.path)
    if args.json:
        print(json.dumps({"path": args.path, "checksums": on}))
    else:
        done = " (converted)" if args.convert else " (refreshed)" if args.refresh else ""
        hint = "" if on else "; turn them on with: localstore checksums --convert PATH (rewrites the file)"
        print(f"{args.path}: page checksums {'on' if on else 'off'}{done}{hint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(["--dir", args.dir] + (["--offline"] if args.offline else []))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the ``localstore`` command."""
    parser = argparse.ArgumentParser(
        prog="localstore",
        description="Inspect, query, back up and verify localstore stores.",
        epilog="Example:\n  localstore stats data/kernel-7.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"localstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("info", "Show a store's id and the schema of each collection.")
    p.add_argument("path", help="the store file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = add("stats", "Show row counts, sizes and change-log positions of one or more stores.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="store files")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = add("query", "Print rows of a collection, or the result of a read-only SQL query.")
    p.add_argument("path", help="the store file")
    p.add_argument("collection", nargs="?", help="the collection to read")
    p.add_argument("--where", help="a JSON where-dict, as in Collection.find")
    p.add_argument("--order-by", help="a field; descending as --order-by=-field")
    p.add_argument("--limit", type=int, default=None, help="at most this many rows")
    p.add_argument("--sql", help="a read-only SQL statement instead of a collection")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of JSON lines")
    p.set_defaults(func=cmd_query)

    p = add("backup", "Write an online, consistent copy of a store (safe while writers run).")
    p.add_argument("path", help="the store file")
    p.add_argument("dest", help="the backup file to write (replaced atomically)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_backup)

    p = add("verify", "Check integrity, schema and change log; exit 1 if anything is wrong.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="store files")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)

    p = add("optimize", "Rebuild fragmented vector indexes, refresh statistics, vacuum when worth it.")
    p.add_argument("path", help="the store file")
    p.add_argument("--vacuum", action="store_true", help="always vacuum (by default only when over 20%% is free)")
    p.add_argument("--rewrite-unchecked", action="store_true",
                   help="first rewrite rows whose compressed values predate value checksums (logged like puts)")
    p.set_defaults(func=cmd_optimize)

    p = add("expire", "Delete rows older than their collection's TTL.")
    p.add_argument("path", help="the store file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_expire)

    p = add("checksums", "Show whether a store keeps page checksums; turn them on, or recompute them.")
    p.add_argument("path", help="the store file (closed: --convert and --refresh rewrite it)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--convert", action="store_true", help="rewrite an older store with page checksums (VACUUM)")
    how.add_argument("--refresh", action="store_true",
                     help="recompute every checksum after a deliberate edit by a tool without them; "
                          "never after unexplained damage (restore a backup instead)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_checksums)
    p = sub.add_parser(
        "demo", help="Run the demo: 8 agents, kits, background sync to Postgres, a summary.",
        description="Run the demo: 8 agent stores evolve kernels, remember, record telemetry and checkpoint "
                    "while a background sync ships everything to Postgres (embedded unless "
                    "LOCALSTORE_POSTGRES_URL is set); ends with a summary.",
        epilog="Example:\n  localstore demo --dir data/demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="data/demo", help="the workspace folder to (re)create (default: data/demo)")
    p.add_argument("--offline", action="store_true", help="run without Postgres")
    p.set_defaults(func=cmd_demo)
    _register_sync_commands(sub)
    _register_kit_commands(sub)
    return parser


def _register_kit_commands(sub: Any) -> None:
    """Add the agent kits' subcommands (importers, plot) when the kits provide them."""
    import importlib

    for module in ("localstore.kits.cli", "localstore.kits.import_cli"):
        try:
            kit_cli = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only a missing kit module is expected; a missing dependency inside one is an error.
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise
            continue
        kit_cli.register(sub)


def _register_sync_commands(sub: Any) -> None:
    """Add the sync engine's subcommands (sync, restore, ...) when localstore.sync provides them.

    The engine never depends on sync; this lazy import is the one place the CLI reaches it.
    """
    try:
        from localstore.sync import cli as sync_cli  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        return
    sync_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``localstore`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LocalStoreError as exc:
        print(f"localstore: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("localstore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
