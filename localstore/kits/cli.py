"""The kits' ``localstore`` subcommands: ``import-telemetry`` and ``plot``.

``localstore/cli.py`` calls ``register(subparsers)``; each command prints one line
per problem to stderr and returns an exit code (errors derive from LocalStoreError,
which the main command turns into ``localstore: error: ...`` and exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import localstore as ls

EXAMPLES = {
    "import-telemetry": (
        "Examples:\n"
        "  localstore import-telemetry logs/telemetry/ data/kernel-7.db\n"
        "  localstore import-telemetry logs/run-7.jsonl data/kernel-7.db --session run-7\n"
        "  localstore import-telemetry logs/emergencies.json data/kernel-7.db --kind emergency --json\n\n"
        "Files: *.jsonl are telemetry sessions, *.json emergency events (see localstore.kits.importers).\n"
        "Re-running an import adds nothing. Malformed lines are reported as FILE:LINE: reason and skipped."
    ),
    "plot": (
        "Example:\n"
        "  localstore plot data/kernel-7.db run-7 -o run-7.png\n\n"
        "Needs matplotlib: pip install 'localstore[bench]' (or pip install matplotlib)."
    ),
}


def cmd_import_telemetry(args: argparse.Namespace) -> int:
    from .importers import import_path

    progress: Any = False if (args.quiet or args.json) else None
    with ls.open(args.store) as store:
        reports = import_path(store, args.path, kind=args.kind, session_id=args.session,
                              batch_size=args.batch, progress=progress)
    errors = [e for r in reports for e in r.errors]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for error in errors:
            print(f"skipped {error}", file=sys.stderr)
        if not args.quiet:
            for r in reports:
                what = (f"{r.records_added} records added ({r.records_present} already present), "
                        if r.kind == "telemetry" else "")
                print(f"{r.path}: {what}{r.events_added} emergency events added ({r.events_present} already present), "
                      f"{len(r.errors)} lines skipped; sessions {', '.join(r.sessions) or 'none'}")
            if not reports:
                print(f"no telemetry (*.jsonl) or emergency (*.json) files under {args.path}")
    return 1 if errors and args.strict else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .telemetry import Telemetry

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("localstore: error: plot needs matplotlib; install it with: pip install 'localstore[bench]' "
              "(or pip install matplotlib)", file=sys.stderr)
        return 1
    with ls.open(args.store, create=False) as store:
        if "telemetry_sessions" not in store:
            raise ls.UnknownCollectionError(f"{args.store} has no telemetry; import some with localstore import-telemetry")
        tm = Telemetry(store)
        if tm.get_session(args.session_id) is None:
            known = ", ".join(tm.sessions.keys(limit=10)) or "none"
            raise ls.QueryError(f"{args.store}: no telemetry session {args.session_id!r} (sessions: {known})")
        records = tm.session_records(args.session_id)
        events = tm.emergencies.find({"session_id": args.session_id}, order_by="timestamp")
    steps = [r["step"] for r in records]
    fig, (ax_phi, ax_kappa) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    ax_phi.plot(steps, [r["phi"] if r["phi"] is not None else float("nan") for r in records],
                color="tab:blue", lw=0.8, label="phi")
    ax_phi.set_ylabel("phi")
    ax_kappa.plot(steps, [r["kappa_eff"] if r["kappa_eff"] is not None else float("nan") for r in records],
                  color="tab:orange", lw=0.8, label="kappa_eff")
    ax_kappa.set_ylabel("kappa_eff")
    ax_kappa.set_xlabel("step")
    # Flagged records: red dots on the phi curve; emergency events: dashed lines across both panels.
    flagged = [r for r in records if r["emergency"] and r["phi"] is not None]
    if flagged:
        ax_phi.scatter([r["step"] for r in flagged], [r["phi"] for r in flagged], s=6, color="tab:red",
                       zorder=3, label="emergency flag")
    event_steps = sorted(_event_steps(events, records))
    for ax in (ax_phi, ax_kappa):
        for i, step in enumerate(event_steps):
            ax.axvline(step, color="tab:red", alpha=0.7, lw=1, ls="--", label="emergency event" if i == 0 else None)
        ax.legend(loc="upper right", fontsize="small")
    marked = sorted({r["step"] for r in records if r["emergency"]} | set(event_steps))
    ax_phi.set_title(f"session {args.session_id}: {len(records)} steps, {len(event_steps)} emergency events, "
                     f"{len(flagged)} flagged steps")
    fig.tight_layout()
    fig.savefig(args.output, dpi=args.dpi)
    plt.close(fig)
    if not args.quiet:
        print(f"wrote {args.output}: {len(records)} steps, {len(event_steps)} emergency events and "
              f"{len(marked)} emergency steps marked")
    return 0


def _event_steps(events: list[dict[str, Any]], records: list[dict[str, Any]]) -> set[int]:
    """Steps of emergency events: their own step, else the last record at or before their time."""
    import bisect
    import itertools

    times = [r["timestamp"] for r in records]
    ordered = all(a <= b for a, b in itertools.pairwise(times))
    out = set()
    for e in events:
        if e["step"] is not None:
            out.add(int(e["step"]))
        elif records and ordered:
            i = max(0, bisect.bisect_right(times, e["timestamp"]) - 1)
            out.add(int(records[i]["step"]))
    return out


def register(sub: Any) -> None:
    """Add the kits' subcommands to the ``localstore`` command's subparsers."""

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser

    p = add("import-telemetry", "Import telemetry JSONL session files and emergency JSON files into a store.")
    p.add_argument("path", help="a file, or a folder searched for *.jsonl and *.json files")
    p.add_argument("store", help="the store file (created if missing)")
    p.add_argument("--kind", choices=("auto", "telemetry", "emergency"), default="auto",
                   help="the files' kind (default: by suffix)")
    p.add_argument("--session", help="session id for lines that name none (default: the file name)")
    p.add_argument("--batch", type=int, default=5000, help="records per transaction (default 5000)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--json", action="store_true", help="print the import reports as JSON")
    p.set_defaults(func=cmd_import_telemetry)

    p = add("plot", "Write a PNG of a telemetry session: phi and kappa against step, emergencies marked.")
    p.add_argument("store", help="the store file")
    p.add_argument("session_id", help="the telemetry session")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default 120)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_plot)
