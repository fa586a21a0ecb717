"""`run.py sync --quick --json` works end to end on tiny sizes; no timing thresholds, only shape and sanity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT
from pg_fixture import PgServer

FIGURES = ["drain.rate", "drain.vs_copy", "lag.p50_ms", "lag.p99_ms", "idle.cpu_pct", "pickup.total_s",
           "pickup.per_store_ms"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def test_sync_benchmark_quick_json(tmp_path: Path, pg_server: PgServer, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "TMPDIR": str(tmp_path), "LOCALSTORE_POSTGRES_URL": pg_server.url,
           "LOCALSTORE_BENCH_TINY": "1"}
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "run.py"), "sync", "--quick", "--json"],
                            check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["benchmarks"]["sync"]
    for name in ("drain.localstore", "drain.raw_copy"):
        assert report["timings"][name]["rate_per_s"] > 0
    for name in FIGURES:
        value = report["figures"][name]["value"]
        assert _finite(value), (name, value)
    for name in ("drain.rate", "lag.p99_ms", "idle.cpu_pct"):
        assert isinstance(report["figures"][name]["target"]["met"], bool)

    # The drain curve: every backlog size has both sides, and the smaller ones a ratio.
    params = report["params"]
    curve = params["drain_curve"]
    sizes = [point["changes"] for point in curve]
    assert sizes == sorted(sizes) and len(sizes) >= 2 and sizes[-1] == params["drain_changes"]
    for point in curve:
        assert _finite(point["ours_s"]) and _finite(point["raw_copy_s"]), point
    for n in sizes[:-1]:
        assert report["timings"][f"drain.localstore.{n}"]["items"] == n
        assert report["timings"][f"drain.raw_copy.{n}"]["items"] == n
        assert _finite(report["figures"][f"drain.curve.{n}.vs_copy"]["value"])
        assert report["figures"][f"drain.curve.{n}.vs_copy"]["peers"]  # both sides, for the combined table

    # The stores curve: ours and the raw baseline at every store count.
    counts = [point["stores"] for point in params["stores_curve"]]
    assert counts == list(params["store_counts"]) and len(counts) >= 2
    for count in counts:
        assert report["timings"][f"stores.localstore.{count}"]["items"] == count
        assert report["timings"][f"stores.raw.{count}"]["items"] == count
        for figure in (f"stores.{count}.vs_raw", f"stores.{count}.per_store_ms"):
            assert _finite(report["figures"][figure]["value"]), figure

    assert pg_server.password not in result.stdout + result.stderr
    assert not list(tmp_path.glob("localstore-bench-*")), "the benchmark left its scratch folder behind"


def test_sync_curves_are_drawn_as_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_sync_under_test", ROOT / "benchmarks" / "sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    out = module.plot_curve(tmp_path / "curve.png", "drain", "changes", [(10, 0.5), (100, 2.0)], [(10, 0.1), (100, 0.3)],
                            "ours", "raw COPY")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
