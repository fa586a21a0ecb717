"""`run.py all --quick --json` on tiny sizes: every benchmark runs and every figure is in the JSON.

Peers that are not installed are allowed, as skipped figures with a reason. No timing is checked.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

#: Every figure of the peers benchmark, measured or skipped.
PEER_FIGURES = [
    "insert.ours_rate", "knn.vs_blas", "knn_third.vs_unfiltered",
    "insert.vs_chroma", "knn.vs_chroma", "knn_third.vs_chroma", "knn_rare.vs_chroma",
    "chroma.recall", "chroma.recall_filtered",
    "insert.vs_lancedb", "knn.vs_lancedb", "knn_third.vs_lancedb", "knn_rare.vs_lancedb",
    "ckpt.ours_rate", "ckpt.ours_kb", "ckpt.plain_rate", "ckpt.vs_langgraph", "ckpt.size_vs_langgraph",
    "ckpt.plain_vs_langgraph", "ckpt.plain_size_vs_langgraph", "ckpt.cpu_vs_langgraph", "ckpt.raw_vs_langgraph",
    "pg.single_vs_rowwise", "pg.batch_vs_copy", "pg.sync_vs_copy",
]
BENCHMARKS = ["codecs", "peers", "store", "sync", "vectors"]


def test_all_quick_json_tiny(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "TMPDIR": str(tmp_path), "LOCALSTORE_BENCH_TINY": "1"}
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    result = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "all", "--quick", "--json"],
        check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["quick"] is True and data["tiny"] is True
    assert set(BENCHMARKS) <= set(data["benchmarks"])
    packages = data["environment"]["packages"]
    assert packages["localstore"] and packages["numpy"] != "not installed"
    assert data["environment"]["cpu_model"]

    for name, report in data["benchmarks"].items():
        assert report["figures"], name
        for key, fig in report["figures"].items():
            if fig.get("skipped"):
                assert fig["value"] is None and isinstance(fig["skipped"], str), (name, key)
                continue
            assert isinstance(fig["value"], (int, float)) and math.isfinite(fig["value"]), (name, key, fig)
            if "target" in fig:
                assert isinstance(fig["target"]["met"], bool), (name, key)
    peers = data["benchmarks"]["peers"]["figures"]
    missing = [f for f in PEER_FIGURES if f not in peers]
    assert not missing, missing
    # tiny runs never overwrite the recorded results
    assert (results.read_bytes() if results.exists() else None) == before
    assert not list(tmp_path.glob("localstore-bench-*"))


def test_only_runs_a_part(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "TMPDIR": str(tmp_path), "LOCALSTORE_BENCH_TINY": "1"}
    result = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "all", "--quick", "--only", "peers.checkpoints"],
        check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "checkpoint puts" in result.stdout and "ratio" in result.stdout
    assert "Chroma query" not in result.stdout and "ours / Chroma" not in result.stdout
    bad = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "all", "--only", "nope"],
        check=False, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert bad.returncode != 0 and "unknown part" in bad.stderr
