"""Pull keeps vector and full-text indexes (and warm vector caches) in step, and verify() accepts pulled history."""

from __future__ import annotations

from pathlib import Path

from localstore.sync import SyncEngine, subscribe

import localstore as ls

FIELDS = {"fact": ls.Text(), "note": ls.Text(fulltext=True), "tag": ls.Text(filter=True), "v": ls.Vector(2, metric="l2")}


def _engine(ws: ls.Workspace, url: str, schema: str) -> SyncEngine:
    return SyncEngine(ws, url, schema=schema, watch=False)


def test_pulled_rows_reach_the_indexes_and_the_warm_cache(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    a, b = ws.open("a"), ws.open("b")
    fa, fb = a.collection("facts", key="fact", fields=FIELDS), b.collection("facts", key="fact", fields=FIELDS)
    fb.put({"fact": "own", "note": "local basin", "tag": "x", "v": [100.0, 100.0]})
    assert [h.key for h in fb.nearest("v", [0.0, 0.0], k=1)] == ["own"]  # the cache is now warm
    fa.put_many([{"fact": f"f{i}", "note": f"remote drift {i}", "tag": "y", "v": [float(i), 0.0]} for i in range(5)])
    subscribe(b, "facts")
    engine = _engine(ws, pg_url, pg_schema)
    try:
        engine.sync_now()
        engine.sync_now()
        for eng in ("auto", "vec0"):
            assert [h.key for h in fb.nearest("v", [0.0, 0.0], k=2, engine=eng)] == ["f0", "f1"], eng
            assert [h.key for h in fb.nearest("v", [0.0, 0.0], k=1, where={"tag": "x"}, engine=eng)] == ["own"]
        assert {h.key for h in fb.search(text="drift", k=10)} == {f"f{i}" for i in range(5)}
        # Remote writes over b's own history: an overwrite and a delete of keys b wrote,
        # and a put of a key b deleted.
        fb.put({"fact": "f1", "note": "b's take", "tag": "x", "v": [50.0, 50.0]})
        fb.put({"fact": "f0", "note": "b's own f0", "tag": "x", "v": [60.0, 60.0]})
        fb.delete("f3")
        engine.sync_now()
        fa.delete("f0")
        fa.put({"fact": "f1", "note": "a again", "tag": "y", "v": [1.0, 1.0]})
        fa.put({"fact": "f3", "note": "a revives drift", "tag": "y", "v": [3.0, 0.0]})
        engine.sync_now()
        engine.sync_now()
        assert fb.get("f0") is None and fb.get("f1")["note"] == "a again" and fb.get("f3")["note"] == "a revives drift"
        for eng in ("auto", "vec0"):
            assert [h.key for h in fb.nearest("v", [0.0, 0.0], k=2, engine=eng)] == ["f1", "f2"], eng
        assert {h.key for h in fb.search(text="drift", k=10)} == {"f2", "f3", "f4"}
        report = b.verify()
        assert report.ok, report.problems
    finally:
        engine.close()
        ws.close()
