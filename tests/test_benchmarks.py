"""The benchmark runner works end to end; no timing thresholds, only shape and sanity."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

STORE_TIMINGS = [
    "put_many.localstore",
    "put_many.localstore_nosync",
    "put_many.apsw",
    "put.localstore",
    "put.apsw",
    "get.localstore",
    "get.apsw",
    "open.localstore",
    "workspace.names",
    "workspace.open_all",
]
STORE_FIGURES = [
    "put_many.vs_apsw",
    "changelog.cost",
    "open.ms",
    "workspace.names_ms",
    "workspace.open_ms",
]


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def test_store_benchmark_quick_json(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """`run.py store --quick --json` exits 0 and prints one JSON object with positive figures."""
    env = {**subprocess_env, "TMPDIR": str(tmp_path)}  # scratch stores go under the test's folder
    result = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "store", "--quick", "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)

    assert data["quick"] is True
    assert data["environment"]["apsw_sqlite"]
    report = data["benchmarks"]["store"]
    assert report["name"] == "store" and report["quick"] is True

    timings = report["timings"]
    expected = STORE_TIMINGS + (
        ["put_many.sqlite_utils"] if importlib.util.find_spec("sqlite_utils") else []
    )
    for name in expected:
        t = timings[name]
        for key in ("median_s", "best_s", "rate_per_s", "per_item_ms"):
            assert _positive(t[key]), (name, key, t[key])
        assert t["best_s"] <= t["median_s"]
        assert len(t["runs_s"]) == t["repeat"] >= 1

    figures = report["figures"]
    for name in STORE_FIGURES:
        assert _positive(figures[name]["value"]), (name, figures[name])
    for name in ("put_many.vs_apsw", "changelog.cost", "open.ms"):
        assert isinstance(figures[name]["target"]["met"], bool)
    assert isinstance(report["targets_met"], bool)
    assert not list(tmp_path.glob("localstore-bench-*")), (
        "the benchmark left its scratch folder behind"
    )
