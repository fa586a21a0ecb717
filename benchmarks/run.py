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
import importlib.util
import json
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

from _harness import Report, environment, render

#: Files in benchmarks/ that are not benchmarks.
NOT_BENCHMARKS = frozenset({"run"})


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
    args = parser.parse_args(argv)

    chosen = names if args.name == "all" else [args.name]
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
        report = load(name).run(quick=args.quick)
        if not isinstance(report, Report):
            raise SystemExit(
                f"run.py: benchmark {name!r} returned {type(report).__name__}, not a Report"
            )
        reports[name] = report
        if not args.json:
            print(render(report), flush=True)
            print(flush=True)

    if args.json:
        out: dict[str, Any] = {
            "quick": args.quick,
            "environment": env,
            "benchmarks": {name: report.to_json() for name, report in reports.items()},
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
