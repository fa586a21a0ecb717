"""`run.py sync --quick --json` works end to end; no timing thresholds, only shape and sanity."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT
from pg_fixture import PgServer

FIGURES = ["drain.rate", "drain.vs_copy", "lag.p50_ms", "lag.p99_ms", "idle.cpu_pct", "pickup.total_s",
           "pickup.per_store_ms"]


def test_sync_benchmark_quick_json(tmp_path: Path, pg_server: PgServer, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "TMPDIR": str(tmp_path), "LOCALSTORE_POSTGRES_URL": pg_server.url}
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "run.py"), "sync", "--quick", "--json"],
                            check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["benchmarks"]["sync"]
    for name in ("drain.localstore", "drain.raw_copy"):
        assert report["timings"][name]["rate_per_s"] > 0
    for name in FIGURES:
        value = report["figures"][name]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (name, value)
    for name in ("drain.rate", "lag.p99_ms", "idle.cpu_pct"):
        assert isinstance(report["figures"][name]["target"]["met"], bool)
    assert pg_server.password not in result.stdout + result.stderr
    assert not list(tmp_path.glob("localstore-bench-*")), "the benchmark left its scratch folder behind"
