"""The ``localstore sync ...`` and ``localstore restore`` subcommands (registered by ``localstore.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

from .errors import SyncError

EXAMPLES = {
    "sync": "Example:\n  localstore sync once data/ --url postgresql://sync:PASSWORD@db.lan/agents",
    "once": ("Example:\n  export LOCALSTORE_POSTGRES_URL=postgresql://sync:PASSWORD@db.lan/agents\n"
             "  localstore sync once data/"),
    "daemon": ("Example:\n  LOCALSTORE_POSTGRES_URL=postgresql://sync:PASSWORD@db.lan/agents "
               "localstore sync daemon data/ 2>>sync.log"),
    "status": "Example:\n  localstore sync status data/ --json",
    "views": ("Example:\n  localstore sync views --url postgresql://sync:PASSWORD@db.lan/agents\n"
              "  psql ... -c 'SELECT agent, kernel_id, phi FROM agents.kernel_geometry ORDER BY phi DESC LIMIT 5'"),
    "tenancy": ("Example:\n  export LOCALSTORE_POSTGRES_ADMIN_URL=postgresql://admin:PASSWORD@db.lan/agents\n"
                "  localstore sync tenancy setup --owner localstore_owner\n"
                "  TENANT_PW=... localstore sync tenancy grant daemon_lab1 --password-env TENANT_PW"),
    "tenancy setup": ("Example:\n  localstore sync tenancy setup --admin-url postgresql://admin:PASSWORD@db.lan/agents "
                      "--owner localstore_owner"),
    "tenancy grant": ("Example:\n  read -rs PW; export PW\n"
                      "  localstore sync tenancy grant daemon_lab1 --password-env PW "
                      "--admin-url postgresql://admin:PASSWORD@db.lan/agents"),
    "tenancy revoke": "Example:\n  localstore sync tenancy revoke daemon_lab1 --admin-url postgresql://admin:PASSWORD@db.lan/agents",
    "tenancy list": "Example:\n  localstore sync tenancy list --admin-url postgresql://admin:PASSWORD@db.lan/agents",
    "restore": ("Example:\n  localstore restore kernel-7 --from postgresql://sync:PASSWORD@db.lan/agents "
                "--to data/kernel-7.db"),
}


def _fail(exc: BaseException) -> int:
    print(f"localstore: error: {exc}", file=sys.stderr)
    return 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the Postgres URL (default: $LOCALSTORE_POSTGRES_URL, else $DATABASE_URL)")
    p.add_argument("--schema", default=None, help="the Postgres schema holding localstore's tables (default: localstore)")


def cmd_once(args: argparse.Namespace) -> int:
    from . import logs
    from .engine import SyncEngine
    from .url import resolve_url

    try:
        url = resolve_url(args.url)
        logs.setup(url, logging.WARNING)
        extra: dict[str, Any] = {"batch_rows": args.batch_rows} if args.batch_rows else {}
        engine = SyncEngine(args.path, url, **_schema(args), **extra, hnsw=args.hnsw, watch=False)
        total = _pending(engine)
        done = [0]
        tty = sys.stderr.isatty() and not args.quiet
        started = time.perf_counter()

        def progress(n: int) -> None:
            done[0] += n
            if tty and total:
                width = 30
                filled = int(width * min(done[0], total) / total)
                print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done[0]}/{total} changes", end="",
                      file=sys.stderr, flush=True)

        try:
            shipped = engine.sync_now(progress=progress)
        finally:
            engine.close()
        if tty and total:
            print(file=sys.stderr)
        elapsed = time.perf_counter() - started
        if not args.quiet:
            print(f"shipped {shipped} changes from {len(engine.names())} store(s) to {engine.shown_url} "
                  f"in {elapsed:.2f}s")
        return 0
    except SyncError as exc:
        return _fail(exc)


def _pending(engine: Any) -> int:
    import os

    from localstore.store import Store

    total = 0
    for name in engine.names():
        with Store(os.path.join(engine.folder, name + ".db"), create=False) as store:
            total += store.changelog.pending()
    return total


def _schema(args: argparse.Namespace) -> dict[str, Any]:
    return {"schema": args.schema} if args.schema else {}


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import logs
    from .engine import FATAL, SyncEngine
    from .url import resolve_url

    log = logging.getLogger("localstore.sync")
    try:
        url = resolve_url(args.url)
    except SyncError as exc:
        return _fail(exc)
    logs.setup(url, logging.DEBUG if args.verbose else logging.INFO)
    try:
        engine = SyncEngine(args.path, url, **_schema(args), hnsw=args.hnsw, debounce=args.debounce)
        try:
            engine.central.connect()
        except FATAL as exc:
            log.error(str(exc), extra={"event": "fatal"})
            return _fail(exc)
        except SyncError as exc:  # unreachable: start anyway; the engine retries with backoff
            log.warning(str(exc), extra={"event": "postgres_down"})
    except SyncError as exc:
        return _fail(exc)
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal received; stopping", extra={"event": "signal", "signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine.start()
    while not done.wait(3600):
        pass
    engine.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import status
    from .url import redact, resolve_url

    try:
        url: str | None = None
        try:
            url = resolve_url(args.url)
        except SyncError:
            url = None  # local positions only
        rows, problem = status(args.path, url, **_schema(args))
    except SyncError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"url": redact(url) if url else None, "postgres_error": problem,
                          "stores": [r.as_dict() for r in rows]}, indent=2))
        return 0
    if url:
        print(f"postgres {redact(url)}" + (f"  (unavailable: {problem})" if problem else ""))
    print(f"{'store':<28} {'pending':>9} {'last seq':>9} {'acked':>9} {'lag':>9}  last sync")
    for r in rows:
        print(f"{r.name:<28} {r.pending:>9} {r.last_seq:>9} {r.watermark:>9} {r.lag_s:>8.1f}s  {r.last_sync or '-'}")
    return 0


def cmd_views(args: argparse.Namespace) -> int:
    from .url import redact, resolve_url
    from .views import DEFAULT_VIEWS_SCHEMA, create_kit_views

    try:
        url = resolve_url(args.url)
        made = create_kit_views(url, views_schema=args.views_schema or DEFAULT_VIEWS_SCHEMA, **_schema(args))
    except SyncError as exc:
        return _fail(exc)
    schema = args.views_schema or DEFAULT_VIEWS_SCHEMA
    print(f"{redact(url)}: {len(made)} views in schema {schema}: {', '.join(made) or 'none (nothing synced yet)'}")
    return 0


def _admin_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-url", default=None,
                   help="the admin's Postgres URL: a superuser, or a CREATEROLE role owning the schema "
                        "(default: $LOCALSTORE_POSTGRES_ADMIN_URL)")
    p.add_argument("--schema", default=None, help="the Postgres schema holding localstore's tables (default: localstore)")


def cmd_tenancy_setup(args: argparse.Namespace) -> int:
    from . import tenancy
    from .central import DEFAULT_SCHEMA
    from .url import redact

    try:
        info = tenancy.setup(args.admin_url, args.schema or DEFAULT_SCHEMA, group=args.group, owner=args.owner)
        shown = redact(tenancy._admin_url(args.admin_url))
    except SyncError as exc:
        return _fail(exc)
    print(f"{shown}: schema {info.schema} set up for tenants: row-level security enabled and forced on "
          f"{len(info.tables)} tables, owned by {info.owner}; tenants' group role {info.group}.\n"
          f"Next: localstore sync tenancy grant ROLE --password-env VAR (one login role per sync daemon)")
    return 0


def cmd_tenancy_grant(args: argparse.Namespace) -> int:
    import os

    from . import tenancy
    from .central import DEFAULT_SCHEMA
    from .errors import ConfigError

    try:
        password = None
        if args.password_env:
            password = os.environ.get(args.password_env)
            if not password:
                raise ConfigError(f"--password-env {args.password_env}: that environment variable is empty or unset")
        elif args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
            if not password:
                raise ConfigError("--password-stdin: read an empty password")
        created = tenancy.grant(args.admin_url, args.role, args.schema or DEFAULT_SCHEMA, password=password)
    except SyncError as exc:
        return _fail(exc)
    schema = args.schema or DEFAULT_SCHEMA
    print(f"role {args.role} {'created and ' if created else ''}granted as a tenant of schema {schema}"
          f"{' (password set)' if password else ''}; its daemon syncs with "
          f"--url postgresql://{args.role}:***@HOST/DB --schema {schema}")
    return 0


def cmd_tenancy_revoke(args: argparse.Namespace) -> int:
    from . import tenancy
    from .central import DEFAULT_SCHEMA

    try:
        tenancy.revoke(args.admin_url, args.role, args.schema or DEFAULT_SCHEMA)
    except SyncError as exc:
        return _fail(exc)
    print(f"role {args.role} is no longer a tenant of schema {args.schema or DEFAULT_SCHEMA}; "
          "its stores stay claimed by it")
    return 0


def cmd_tenancy_list(args: argparse.Namespace) -> int:
    from . import tenancy
    from .central import DEFAULT_SCHEMA

    try:
        rows = tenancy.tenants(args.admin_url, args.schema or DEFAULT_SCHEMA)
    except SyncError as exc:
        return _fail(exc)
    print(f"{'tenant role':<32} {'stores':>7}")
    for role, n in rows:
        print(f"{role:<32} {n:>7}")
    return 0


def _register_tenancy(ss: Any, fmt: Any) -> None:
    desc = ("Row-level security in the central Postgres, so that each sync daemon's role reads and writes only "
            "its own stores' rows (FORCE ROW LEVEL SECURITY; tenants are neither owners nor superusers).")
    t = ss.add_parser("tenancy", help="Isolate sync daemons from each other with row-level security.",
                      description=desc, epilog=EXAMPLES["tenancy"], formatter_class=fmt)
    ts = t.add_subparsers(dest="tenancy_command", metavar="SUBCOMMAND", required=True)

    p = ts.add_parser("setup", help="Create or update the central schema with RLS forced on every table.",
                      description="Create or update the central schema as the admin: an owner role owns the "
                                  "tables, RLS is enabled and forced on each (and on state tables created later), "
                                  "policies key rows on their store id, and a tenants' group role is made. "
                                  "Idempotent; run again after upgrading localstore.",
                      epilog=EXAMPLES["tenancy setup"], formatter_class=fmt)
    _admin_common(p)
    p.add_argument("--owner", default=None,
                   help="a plain role (created NOLOGIN if missing) to own the tables and the definer function; "
                        "needs a superuser admin URL (default: the admin's own role)")
    p.add_argument("--group", default=None, help="the tenants' group role (default: SCHEMA_tenants)")
    p.set_defaults(func=cmd_tenancy_setup)

    p = ts.add_parser("grant", help="Make a login role a tenant (created if missing).",
                      description="Make a login role a tenant: created (LOGIN, no superuser, no BYPASSRLS) if "
                                  "missing, and added to the tenants' group. The password is read from an "
                                  "environment variable or stdin, never from the command line, and is hashed "
                                  "(SCRAM-SHA-256) before it is sent.",
                      epilog=EXAMPLES["tenancy grant"], formatter_class=fmt)
    p.add_argument("role", help="the daemon's login role")
    _admin_common(p)
    p.add_argument("--password-env", default=None, metavar="VAR", help="set the role's password from $VAR")
    p.add_argument("--password-stdin", action="store_true", help="set the role's password from one line of stdin")
    p.set_defaults(func=cmd_tenancy_grant)

    p = ts.add_parser("revoke", help="Remove a role from the tenants (its stores stay claimed by it).",
                      description="Remove a role from the tenants' group; its stores stay claimed by it.",
                      epilog=EXAMPLES["tenancy revoke"], formatter_class=fmt)
    p.add_argument("role", help="the daemon's login role")
    _admin_common(p)
    p.set_defaults(func=cmd_tenancy_revoke)

    p = ts.add_parser("list", help="Show each tenant role and how many stores it holds.",
                      description="Show each tenant role and how many stores it holds.",
                      epilog=EXAMPLES["tenancy list"], formatter_class=fmt)
    _admin_common(p)
    p.set_defaults(func=cmd_tenancy_list)


def cmd_restore(args: argparse.Namespace) -> int:
    import os

    from .replicate import restore
    from .url import redact, resolve_url

    try:
        url = resolve_url(args.source)
        to = args.to or os.path.join(".", args.name + ".db")

        def progress(collection: str, n: int) -> None:
            if not args.quiet:
                print(f"  {collection}: {n} rows", file=sys.stderr)

        started = time.perf_counter()
        store = restore(url, args.name, to, **_schema(args), host=args.host, progress=progress)
        try:
            report = store.verify()
            sid, last = store.id, store.changelog.last_seq()
        finally:
            store.close()
        print(f"restored {args.name} (id {sid}) from {redact(url)} to {to} in {time.perf_counter() - started:.2f}s; "
              f"seq continues after {last}; verify: {'ok' if report.ok else 'PROBLEMS: ' + '; '.join(report.problems)}")
        return 0 if report.ok else 1
    except SyncError as exc:
        return _fail(exc)


def register(sub: Any) -> None:
    """Add ``sync`` (once, daemon, status, views, tenancy) and ``restore`` to the ``localstore`` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    sync = sub.add_parser("sync", help="Ship stores' change logs to a central Postgres.",
                          description="Ship stores' change logs to a central Postgres.", epilog=EXAMPLES["sync"],
                          formatter_class=fmt)
    ss = sync.add_subparsers(dest="sync_command", metavar="SUBCOMMAND", required=True)

    p = ss.add_parser("once", help="Ship every pending change of a workspace (or store) once, then exit.",
                      description="Ship every pending change of a workspace (or store) once, then exit.",
                      epilog=EXAMPLES["once"], formatter_class=fmt)
    p.add_argument("path", help="a workspace folder or a store file")
    _common(p)
    p.add_argument("--hnsw", action="store_true", help="create HNSW indexes on vector columns")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--batch-rows", type=int, default=None, help="most changes per Postgres transaction")
    p.set_defaults(func=cmd_once)

    p = ss.add_parser("daemon", help="Watch a workspace and ship changes as they are written (JSON logs on stderr).",
                      description="Watch a workspace and ship changes as they are written; SIGTERM/SIGINT stop it.",
                      epilog=EXAMPLES["daemon"], formatter_class=fmt)
    p.add_argument("path", help="a workspace folder or a store file")
    _common(p)
    p.add_argument("--hnsw", action="store_true", help="create HNSW indexes on vector columns")
    p.add_argument("--debounce", type=float, default=0.02, help="seconds to wait after a write before syncing")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_daemon)

    p = ss.add_parser("status", help="Show per store the pending changes, the last sync and the lag.",
                      description="Show per store the pending changes, the last sync and the lag.",
                      epilog=EXAMPLES["status"], formatter_class=fmt)
    p.add_argument("path", help="a workspace folder or a store file")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = ss.add_parser("views", help="Create the agent kits' views (kernel_geometry, memories, ...) in Postgres.",
                      description="Create or replace, in their own schema, a view per synced kit table under the "
                                  "names the replaced systems used, plus latest_telemetry, best_checkpoints, "
                                  "emergency_summary and session_stats.",
                      epilog=EXAMPLES["views"], formatter_class=fmt)
    _common(p)
    p.add_argument("--views-schema", default=None, help="the schema for the views (default: agents)")
    p.set_defaults(func=cmd_views)

    _register_tenancy(ss, fmt)

    p = sub.add_parser("restore", help="Rebuild a store from the central Postgres (same id, rows and schema).",
                       description="Rebuild a store from the central Postgres (same id, rows and schema).",
                       epilog=EXAMPLES["restore"], formatter_class=fmt)
    p.add_argument("name", help="the store's name (or id) as registered in Postgres")
    p.add_argument("--from", dest="source", default=None,
                   help="the Postgres URL (default: $LOCALSTORE_POSTGRES_URL, else $DATABASE_URL)")
    p.add_argument("--to", default=None, help="the store file to create (default: ./NAME.db)")
    p.add_argument("--host", default=None, help="pick the store of this host when several share the name")
    p.add_argument("--schema", default=None, help="the Postgres schema holding localstore's tables")
    p.add_argument("--quiet", action="store_true", help="no per-collection progress")
    p.set_defaults(func=cmd_restore)
