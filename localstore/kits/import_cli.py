"""The ``localstore import-sqlite`` subcommand: a table of an SQLite database into a collection.

``register(subparsers)`` adds it to the ``localstore`` command (``localstore/cli.py`` calls it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import localstore as ls

from .sqlite_import import DEFAULT_BATCH_ROWS, SqliteImportError, import_sqlite_table

EXAMPLE = (
    "Examples:\n"
    "  localstore import-sqlite evolution.db programs data/agent-1.db programs --key id\n"
    "  localstore import-sqlite legacy.db runs data/agent-1.db evolution_rounds --map id=round_number --map notes=\n"
    "\n"
    "Re-running an import adds nothing. Rows that cannot be imported are listed with their row\n"
    "numbers on stderr and skipped; --strict makes the exit code 1 when there are any."
)


def _parse_map(items: list[str]) -> dict[str, str | None]:
    mapping: dict[str, str | None] = {}
    for item in items:
        column, sep, field = item.partition("=")
        if not sep or not column:
            raise SqliteImportError(f"import-sqlite: --map takes COLUMN=FIELD (or COLUMN= to leave it out), got {item!r}")
        mapping[column] = field or None
    return mapping


def cmd_import_sqlite(args: argparse.Namespace) -> int:
    """Run ``localstore import-sqlite``."""
    mapping = _parse_map(args.map or [])
    progress: Any = False if (args.quiet or args.json) else None
    with ls.open(args.store) as store:
        report = import_sqlite_table(
            args.source, args.table, store, args.collection, key=args.key, mapping=mapping,
            batch_size=args.batch, progress=progress,
        )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for bad in report.skipped:
            print(f"row {bad.row_number} skipped: {bad.reason}", file=sys.stderr)
        if not args.quiet:
            print(report.summary())
    return 1 if (args.strict and report.skipped) else 0


def register(subparsers: Any) -> None:
    """Add ``import-sqlite`` to the ``localstore`` command's subparsers."""
    text = "Import a table of an SQLite database into a collection (types inferred; idempotent)."
    p = subparsers.add_parser("import-sqlite", help=text, description=text, epilog=EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC.db", help="the SQLite database to read (opened read-only)")
    p.add_argument("table", metavar="TABLE", help="the table (or view) to import")
    p.add_argument("store", metavar="STORE", help="the localstore file to write (created if missing)")
    p.add_argument("collection", metavar="COLLECTION", help="the collection to write (declared if missing)")
    p.add_argument("--key", metavar="COL", help="the column keying the rows (default: the primary key, else the rowid)")
    p.add_argument("--map", action="append", metavar="COL=FIELD",
                   help="store column COL as field FIELD; COL= leaves it out (repeatable)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH_ROWS, help=f"rows per transaction (default {DEFAULT_BATCH_ROWS})")
    p.add_argument("--strict", action="store_true", help="exit 1 if any row was skipped")
    p.add_argument("--quiet", action="store_true", help="print nothing but skipped rows")
    p.add_argument("--json", action="store_true", help="print the report as JSON (skipped rows included)")
    p.set_defaults(func=cmd_import_sqlite)


__all__ = ["cmd_import_sqlite", "register"]
