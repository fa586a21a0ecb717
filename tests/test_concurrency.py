"""Concurrency: several processes writing one store, threads sharing one Store, a reader beside a writer."""

from __future__ import annotations

import random
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from _workers import items, mixed_row, ordered, ordered_row, reaped, result_of, spawn, wait_ready

import localstore as ls

PROCS = 4
PUTS_PER_PROC = 1_000


def all_changes(store: ls.Store) -> list[ls.Change]:
    """The whole change log, read in batches."""
    return list(store.changelog.iter_changes(batch=500))


def check_multi_writer_store(path: Path, procs: int, puts: int) -> None:
    """Every row of every worker is present and the change log has exactly one record per put."""
    with ls.open(path) as store:
        coll = items(store)
        assert coll.count() == procs * puts
        for w in range(procs):
            keys = set(coll.keys(where={"owner": w}))
            assert keys == {f"w{w}-{i}" for i in range(puts)}, f"worker {w}: {procs * puts - len(keys)} rows missing"
        rows = {r["k"]: r for r in coll.find()}
        for key, row in rows.items():
            w, i = key[1:].split("-")
            assert row == {"k": key, "owner": int(w), "i": int(i), "body": f"row {i} of worker {w}"}
        changes = all_changes(store)
        assert len(changes) == procs * puts
        seqs = [c.seq for c in changes]
        assert len(set(seqs)) == len(seqs)
        assert all(a < b for a, b in pairwise(seqs))
        assert all(a.hlc < b.hlc for a, b in pairwise(changes))
        assert {c.key for c in changes} == set(rows)
        assert all(c.op == "put" and c.payload is not None for c in changes)
        # Each worker's own puts appear in the log in the order it made them.
        for w in range(procs):
            mine = [int(c.key.split("-")[1]) for c in changes if c.key.startswith(f"w{w}-")]
            assert mine == list(range(puts))
        assert store.changelog.last_seq() == seqs[-1]
        report = store.verify()
        assert report.ok, str(report)


def run_writers(path: Path, env: dict[str, str], procs: int, puts: int, open_after_go: bool) -> None:
    """Start ``procs`` put workers together on one store and check each reports no error."""
    go = path.parent / "go"
    children = [spawn(["puts", str(path), str(go), str(w), str(puts), "1" if open_after_go else "0"], env)
                for w in range(procs)]
    with reaped(children):
        if not open_after_go:
            wait_ready(go, [str(w) for w in range(procs)], children)
        go.touch()
        results = [result_of(p, timeout_s=240) for p in children]
    for w, result in enumerate(results):
        assert result["errors"] == 0, f"worker {w} saw {result['errors']} errors:\n" + "\n".join(result["first_errors"])
        assert result["done"] == puts


def test_four_processes_put_into_one_store(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """(a) 4 processes x 1,000 single puts at once: every row lands, no errors, one change each."""
    path = tmp_path / "shared.db"
    with ls.open(path) as store:
        items(store)
    run_writers(path, subprocess_env, PROCS, PUTS_PER_PROC, open_after_go=False)
    check_multi_writer_store(path, PROCS, PUTS_PER_PROC)


def test_processes_create_the_same_new_store_at_once(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Several processes opening a store file that does not exist yet, and declaring its collection, all at once."""
    path = tmp_path / "fresh.db"
    run_writers(path, subprocess_env, PROCS, 100, open_after_go=True)
    check_multi_writer_store(path, PROCS, 100)


def test_processes_mixing_puts_deletes_and_transactions(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """4 processes doing random puts, deletes, put_many and (nested) transactions on shared keys stay consistent."""
    path = tmp_path / "mixed.db"
    with ls.open(path) as store:
        items(store)
    go = tmp_path / "go"
    seed = random.randrange(2**32)
    children = [spawn(["mixed", str(path), str(go), str(w), "400", str(seed + w)], subprocess_env) for w in range(PROCS)]
    with reaped(children):
        wait_ready(go, [str(w) for w in range(PROCS)], children)
        go.touch()
        results = [result_of(p, timeout_s=240) for p in children]
    for w, result in enumerate(results):
        assert result["errors"] == 0, f"(seed {seed}) worker {w}:\n" + "\n".join(result["first_errors"])
    with ls.open(path) as store:
        report = store.verify()
        assert report.ok, f"(seed {seed})\n{report}"
        coll = items(store)
        rows = {r["k"]: r for r in coll.find()}
        changes = all_changes(store)
        assert [c.seq for c in changes] == sorted({c.seq for c in changes})
        newest: dict[str, ls.Change] = {}
        for change in changes:
            if change.op == "put":
                assert change.payload is not None
                written = coll.decode_payload(change.payload)
                assert written == mixed_row(change.key, written["owner"], written["i"]), (seed, change)
            newest[change.key] = change
        assert set(rows) == {k for k, c in newest.items() if c.op == "put"}, seed
        for key, row in rows.items():
            assert newest[key].payload is not None
            assert coll.decode_payload(newest[key].payload) == row, (seed, key)
        # Each worker's puts are logged in the order it made them (its counter only grows).
        for w in range(PROCS):
            mine = [c.payload["i"] for c in changes if c.payload is not None and c.payload["owner"] == w]
            assert mine == sorted(mine) and len(mine) == len(set(mine)), (seed, w)


def test_a_field_added_by_another_process_is_read_and_logged(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """A store that cached a collection sees a field another process added: in rows and in change payloads."""
    path = tmp_path / "evolve.db"
    with ls.open(path) as store:
        coll = items(store)
        coll.put({"k": "old", "owner": 1, "i": 1, "body": "b"})
        assert [c.key for c in store.changelog.changes()] == ["old"]  # caches the schema
        child = spawn(["add-field", str(path)], subprocess_env)
        with reaped([child]):
            assert result_of(child, timeout_s=60)["errors"] == 0
        # Reads after the other process's change.
        assert coll.get("with-note") == {"k": "with-note", "owner": 99, "i": 0, "body": "", "note": "hello"}
        payloads = {c.key: c.payload for c in store.changelog.changes()}
        assert payloads["with-note"] is not None and payloads["with-note"]["note"] == "hello"
        assert coll.find(where={"note": "hello"})[0]["k"] == "with-note"
        # Writes after it: the new field takes its default (None) and the log records it.
        coll.put({"k": "new", "owner": 1, "i": 2, "body": "b"})
        assert coll.get("new") == {"k": "new", "owner": 1, "i": 2, "body": "b", "note": None}
        assert store.verify().ok


# -- threads sharing one Store object -----------------------------------------------------------

THREADS = 8
ITERATIONS = 120


def test_threads_share_one_store(store: ls.Store) -> None:
    """(b) 8 threads on one Store: puts, gets, finds and transactions, with no errors and no interleaving."""
    coll = items(store)
    pairs = store.collection("pairs", key="k", fields={"k": ls.Text(), "v": ls.Text()})
    errors: list[str] = []
    start = threading.Barrier(THREADS, timeout=30)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(ITERATIONS):
                key = f"t{t}-{i}"
                assert coll.put({"k": key, "owner": t, "i": i, "body": "b" * (i % 50)}) == key
                assert coll.get(key) == {"k": key, "owner": t, "i": i, "body": "b" * (i % 50)}
                mine = coll.find(where={"owner": t})
                assert [r["i"] for r in mine] == list(range(i + 1)), f"thread {t} sees {len(mine)} of its {i + 1} rows"
                # Every thread writes the same two rows in one transaction; nobody may slip in between.
                value = f"{t}:{i}"
                with store.transaction():
                    pairs.put({"k": "a", "v": value})
                    time.sleep(0)  # let other threads run; they must wait for this block
                    assert pairs.get("a") == {"k": "a", "v": value}
                    pairs.put({"k": "b", "v": value})
                    assert pairs.get("a") == {"k": "a", "v": value}
                with store.transaction():
                    a, b = pairs.get("a"), pairs.get("b")
                assert a is not None and b is not None and a["v"] == b["v"], (a, b)
                if i % 10 == 0:
                    # A rolled-back transaction leaves nothing behind, even with other threads writing.
                    try:
                        with store.transaction():
                            pairs.put({"k": "a", "v": "never"})
                            pairs.put({"k": "b", "v": "never"})
                            raise KeyError("roll back")
                    except KeyError:
                        pass
                    assert coll.count(where={"owner": t}) == i + 1
        except Exception as exc:  # noqa: BLE001 - collected for the main thread's assertion
            import traceback

            errors.append(f"thread {t}: {exc!r}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=180)
    assert not any(th.is_alive() for th in threads), "threads still running after 180 s (deadlock?)"
    assert not errors, "\n".join(errors[:3])

    assert coll.count() == THREADS * ITERATIONS
    for t in range(THREADS):
        assert set(coll.keys(where={"owner": t})) == {f"t{t}-{i}" for i in range(ITERATIONS)}
    # In the change log, each transaction's two records are adjacent: a then b, same value.
    pair_changes = [c for c in all_changes(store) if c.collection == "pairs"]
    assert len(pair_changes) == 2 * THREADS * ITERATIONS
    for first, second in zip(pair_changes[::2], pair_changes[1::2]):
        assert (first.key, second.key) == ("a", "b")
        assert second.seq == first.seq + 1, "another write landed inside a transaction"
        assert first.payload is not None and second.payload is not None
        assert first.payload["v"] == second.payload["v"] != "never"
    assert len({c.payload["v"] for c in pair_changes[::2] if c.payload}) == THREADS * ITERATIONS
    report = store.verify()
    assert report.ok, str(report)


def test_threads_with_their_own_store_objects(store_path: Path) -> None:
    """Threads each opening the same file (the documented way to read in parallel) while writing too."""
    with ls.open(store_path) as s:
        items(s)
    errors: list[str] = []
    start = threading.Barrier(4, timeout=30)

    def work(t: int) -> None:
        try:
            with ls.open(store_path) as own:
                coll = items(own)
                start.wait()
                for i in range(150):
                    coll.put({"k": f"o{t}-{i}", "owner": t, "i": i, "body": ""})
                    assert coll.count(where={"owner": t}) == i + 1
        except Exception as exc:  # noqa: BLE001
            import traceback

            errors.append(f"thread {t}: {exc!r}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    assert not errors, "\n".join(errors[:3])
    with ls.open(store_path) as s:
        assert items(s).count() == 600
        assert len(all_changes(s)) == 600
        assert s.verify().ok


# -- a reader process beside a writer process ---------------------------------------------------

WRITER_LIMIT = 3_000


def test_reader_process_while_writer_writes(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """(c) A reader process reads while a writer process writes: no errors, every snapshot a committed prefix."""
    path = tmp_path / "rw.db"
    with ls.open(path) as store:
        ordered(store)
    go, stop = tmp_path / "go", tmp_path / "stop"
    writer = spawn(["ordered-writer", str(path), str(go), str(stop), str(WRITER_LIMIT)], subprocess_env)
    reader = spawn(["reader", str(path), str(go), str(stop), "400"], subprocess_env)
    with reaped([writer, reader]):
        wait_ready(go, ["writer", "reader"], [writer, reader])
        go.touch()
        written = result_of(writer, timeout_s=180)
        stop.touch()
        read = result_of(reader, timeout_s=180)
    assert written["errors"] == 0, "\n".join(written["first_errors"])
    assert read["errors"] == 0, "\n".join(read["first_errors"])
    assert read["reads"] > 0
    assert written["written"] == WRITER_LIMIT
    with ls.open(path) as store:
        coll = ordered(store)
        assert coll.keys() == list(range(WRITER_LIMIT))
        assert coll.get(WRITER_LIMIT - 1) == ordered_row(WRITER_LIMIT - 1)
        assert store.verify().ok


def test_sync_style_reader_acks_and_prunes_while_a_process_writes(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Read, acknowledge and prune the log (as the sync engine does) while another process writes: each change once, in order."""
    path = tmp_path / "sync.db"
    with ls.open(path) as store:
        ordered(store)
    go, stop = tmp_path / "go", tmp_path / "stop"
    limit = 2_000
    writer = spawn(["ordered-writer", str(path), str(go), str(stop), str(limit)], subprocess_env)
    shipped: list[ls.Change] = []
    with reaped([writer]), ls.open(path) as store:
        log = store.changelog
        wait_ready(go, ["writer"], [writer])
        go.touch()
        watermark = 0
        deadline = time.monotonic() + 180
        for _ in range(1_000_000):
            done = writer.poll() is not None or time.monotonic() > deadline
            batch = log.changes(watermark, limit=150)
            if batch:
                shipped += batch
                watermark = batch[-1].seq
                assert log.ack(watermark) == watermark
                log.prune(keep=0)
            elif done:
                break
        result = result_of(writer, timeout_s=60)
        report = store.verify()
        assert report.ok, str(report)
        assert log.pending() == 0
    assert result["errors"] == 0, "\n".join(result["first_errors"])
    assert [c.key for c in shipped] == list(range(result["written"]))
    assert all(a.seq < b.seq and a.hlc < b.hlc for a, b in pairwise(shipped))
    assert all(c.payload is not None and c.payload["n"] == c.key for c in shipped)


def test_reader_in_parent_sees_prefixes(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """The parent reads through its own Store while a writer process writes: counts only grow, prefixes only."""
    path = tmp_path / "rw2.db"
    with ls.open(path) as store:
        ordered(store)
    go, stop = tmp_path / "go", tmp_path / "stop"
    writer = spawn(["ordered-writer", str(path), str(go), str(stop), "1500"], subprocess_env)
    seen = 0
    problems: list[Any] = []
    with reaped([writer]), ls.open(path) as store:
        coll = ordered(store)
        wait_ready(go, ["writer"], [writer])
        go.touch()
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            keys = coll.keys()
            if keys != list(range(len(keys))) or len(keys) < seen:
                problems.append((seen, len(keys)))
            seen = len(keys)
            with store.transaction():  # a write transaction from the reader's side too
                pass
        result = result_of(writer, timeout_s=60)
    assert not problems
    assert result["errors"] == 0, "\n".join(result["first_errors"])
