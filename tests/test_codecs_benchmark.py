"""`run.py codecs --quick --json` runs end to end; shapes and sanity only, never timing thresholds."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

TIMINGS = [
    "compress.plain", "compress.dict", "decompress.dict",
    "put_many.plain", "put_many.compressed", "put_many.encrypted", "put_many.both",
    "decode.plain", "decode.encrypted", "decode.both", "get.plain", "get.both",
    "encode.incompressible.probed", "encode.incompressible.full", "decode.incompressible", "crc32.64k",
    "put_many.noise.plain", "put_many.noise.compressed",
]
TARGETED = ["ratio.dict", "ratio.dict_vs_zstd", "compress.dict_rate", "put_many.both_vs_plain",
            "decrypt.encrypted_us", "decrypt.both_us", "incompressible.probe_speedup", "normal_f32.ratio"]


def test_codecs_benchmark_quick_json(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "codecs", "--quick", "--json"],
        check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["benchmarks"]["codecs"]
    for name in TIMINGS:
        timing = report["timings"][name]
        assert timing["median_s"] > 0 and timing["best_s"] <= timing["median_s"], name
    figures = report["figures"]
    for name in TARGETED:
        assert isinstance(figures[name]["target"]["met"], bool), name
        assert math.isfinite(figures[name]["value"]) and figures[name]["value"] > 0, name
    # sanity, not speed: a trained dictionary must beat per-value zstd, which must beat nothing
    assert figures["ratio.dict"]["value"] > figures["ratio.zstd"]["value"] > 1.0
    assert figures["ratio.in_store"]["value"] > figures["ratio.zstd"]["value"]
    # incompressible arrays: both sides of each ratio are reported, noise is stored raw (flag and CRC-32
    # only), and the probe still lets normal float32 arrays be compressed
    for name in ("incompressible.probe_speedup", "incompressible.put_vs_plain"):
        assert figures[name]["ours"] and figures[name]["peers"], name
        assert math.isfinite(figures[name]["value"]) and figures[name]["value"] > 0, name
    assert figures["incompressible.encode_us"]["unit"] == "us" and figures["incompressible.encode_us"]["value"] > 0
    assert 0.999 < figures["incompressible.stored_ratio"]["value"] < 1.0
    assert figures["normal_f32.ratio"]["value"] > 1.0
    assert not list(tmp_path.glob("localstore-bench-*"))
