"""Corruption campaign: random byte flips in store files, WAL files, ciphertexts, compressed values, dictionaries.

Each run damages one copy (or one value), reads everything back and runs ``verify()``.
A run's outcome is one of:

- detected: a ``LocalStoreError`` subclass was raised, or ``verify()`` reported a problem;
- harmless: every value read back equals what was written (the byte was in unused space);
- rolled back (WAL only): the store reads as an earlier committed state (SQLite drops WAL frames
  whose checksum fails, and every frame after them); ``open`` checks the WAL first
  (``localstore.walcheck``) and refuses one it would truncate, so this is left only for a WAL
  copied without its ``-shm`` whose damage is in the final commit frame;
- wrong value: a read returned a value that differs from what was written, with no error;
- crash: anything other than a ``LocalStoreError`` escaped.

Crashes must be 0 everywhere, and so must wrong values: stores keep a checksum on every page
by default (``localstore.checksums``), encrypted fields have AES-GCM tags, compressed values
zstd content checksums (a CRC-32 on values stored raw). The one exception is a store made with
``checksums=False``: a flip inside a plain Text or Real value there can read back changed; the
page-checksum campaign below counts those on a control store, not failed.

Run sizes: ``LOCALSTORE_CORRUPTION_SCALE`` (default 1) multiplies every campaign; CI runs
1,400 flips in total.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest

import localstore as ls
from localstore._sqlite import pack_values

SCALE = float(os.environ.get("LOCALSTORE_CORRUPTION_SCALE", "1"))
KEY = ls.generate_key()
WORDS = ["kernel", "basin", "drift", "phi", "regime", "geometric", "collapse", "memory", "agent", "state", "tone"]

FIELDS = {
    "id": ls.Text(),
    "n": ls.Integer(index=True),
    "plain": ls.Text(),
    "secret": ls.Text(encrypt=True),
    "both": ls.Json(encrypt=True, compress=True),
    "arr": ls.Array(compress=True),
    "note": ls.Text(compress=True),
}


def runs(n: int) -> int:
    return max(1, int(n * SCALE))


def make_rows(count: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{
        "id": f"r{i}",
        "n": i,
        "plain": f"plain value {i}",
        "secret": f"secret {i} " + " ".join(rng.choice(WORDS, 5)),
        "both": {"i": i, "goals": list(rng.choice(WORDS, 8))},
        "arr": np.cumsum(rng.standard_normal(64)).astype(np.float32),
        "note": " ".join(rng.choice(WORDS, 90)) + f" #{i}",
    } for i in range(count)]


def same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    if a is None:
        return False
    for k, v in b.items():
        if isinstance(v, np.ndarray):
            if not (isinstance(a[k], np.ndarray) and a[k].dtype == v.dtype and np.array_equal(a[k], v)):
                return False
        elif a[k] != v:
            return False
    return True


def build(path: Path, rows: list[dict[str, Any]], *, train: bool, checksums: bool | None = None) -> None:
    with ls.open(path, key=KEY, checksums=checksums) as store:
        coll = store.collection("things", key="id", fields=FIELDS)
        coll.put_many(rows)
    if train:  # enough compressed bytes are stored that a fresh Store trains a dictionary for "note"
        with ls.open(path, key=KEY) as store:
            store.collection("things").put_many([dict(rows[0], id="trigger")])
            n = store._db.execute("SELECT count(*) FROM _ls_dicts").fetchone()[0]
            assert n >= 1, "no dictionary was trained for the campaign"


class Outcomes(Counter[str]):
    def line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.items()))


def read_all(path: Path, expected: dict[str, dict[str, Any]], older: list[dict[str, dict[str, Any]]] = (),
             *, every_key: bool = True) -> str:
    """Open, read every row, verify; classify the outcome (see the module docstring)."""
    try:
        with ls.open(path, key=KEY, create=False) as store:
            coll = store.collection("things")
            got = {}
            wrong = []
            for key, want in expected.items():
                row = coll.get(key)
                got[key] = row
                if not same(row, want):
                    wrong.append(key)
            keys = set(coll.keys()) if every_key else set(expected)
            report = store.verify()
    except ls.LocalStoreError:
        return "detected"
    except Exception as exc:  # noqa: BLE001
        return f"crash {type(exc).__module__}.{type(exc).__name__}: {exc}"
    if not report.ok:
        return "detected"
    if not wrong and keys == set(expected):
        return "harmless"
    for state in older:
        if keys == set(state) and all(same(got.get(k), state[k]) for k in state):
            return "rolled back"
    if keys != set(expected):
        return "wrong: rows missing or added"
    fields = sorted({f for k in wrong for f, v in expected[k].items() if not same({f: (got[k] or {}).get(f)}, {f: v})})
    return "wrong: " + ",".join(fields)


def flip(data: bytearray, pos: int, rng: random.Random) -> None:
    data[pos] ^= rng.randrange(1, 256)


# -- store files and WAL files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("corruption")
    rows = make_rows(120, 1)
    build(root / "store.db", rows, train=False)
    return root / "store.db", {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def store_file_outcomes(template: tuple[Path, dict[str, dict[str, Any]]],
                        tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcomes, list[str]]:
    src, expected = template
    tmp_path = tmp_path_factory.mktemp("flips")
    original = src.read_bytes()
    rng = random.Random(11)
    out = Outcomes()
    crashes: list[str] = []
    for run in range(runs(400)):
        data = bytearray(original)
        pos = rng.randrange(len(data))
        flip(data, pos, rng)
        path = tmp_path / f"s{run % 4}.db"
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.write_bytes(bytes(data))
        result = read_all(path, expected)
        out[result.split(":")[0] if result.startswith("crash") else result] += 1
        if result.startswith("crash"):
            crashes.append(f"run {run}, byte {pos}: {result}")
    print(f"\nstore file (page checksums, the default): {sum(out.values())} flips: {out.line()}")
    return out, crashes


def test_store_file_flips_are_detected_and_never_misread(store_file_outcomes: tuple[Outcomes, list[str]]) -> None:
    out, _ = store_file_outcomes
    assert out["detected"] > 0
    # No value reads back wrong, plain ones included: the page's checksum fails first.
    assert not [k for k in out if k.startswith("wrong")], out.line()
    # Crashes are asserted by test_store_file_flips_never_crash.


def test_store_file_flips_never_crash(store_file_outcomes: tuple[Outcomes, list[str]]) -> None:
    _, crashes = store_file_outcomes
    assert not crashes, f"{len(crashes)} crashes:\n" + "\n".join(crashes[:10])


@pytest.fixture(scope="module")
def wal_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes, list[dict[str, dict[str, Any]]]]:
    """A store file, its WAL holding six commits, and the -shm a crash at that moment leaves behind."""
    root = tmp_path_factory.mktemp("wal")
    rows = make_rows(60, 2)
    with ls.open(root / "store.db", key=KEY) as store:
        coll = store.collection("things", key="id", fields=FIELDS)
        coll.put_many(rows[:30])
        store.optimize()  # the first 30 rows are in the main file
        store._db.execute("PRAGMA wal_autocheckpoint=0")
        states = [{r["id"]: r for r in rows[:30]}]
        for i in range(30, 60, 5):  # six commits that live only in the WAL
            coll.put_many(rows[i:i + 5])
            states.append({r["id"]: r for r in rows[: i + 5]})
        files = [(root / f"store.db{s}").read_bytes() for s in ("", "-wal", "-shm")]
    return files[0], files[1], files[2], states


def wal_flips(template: tuple[bytes, bytes, bytes, list[dict[str, dict[str, Any]]]], tmp_path: Path,
              *, with_shm: bool, seed: int) -> Outcomes:
    main, wal, shm, states = template
    expected, older = states[-1], states[:-1][::-1]
    rng = random.Random(seed)
    out = Outcomes()
    for run in range(runs(300)):
        data = bytearray(wal)
        pos = rng.randrange(len(data))
        flip(data, pos, rng)
        path = tmp_path / f"w{run % 4}.db"
        Path(f"{path}-shm").unlink(missing_ok=True)
        path.write_bytes(main)
        Path(f"{path}-wal").write_bytes(bytes(data))
        if with_shm:
            Path(f"{path}-shm").write_bytes(shm)
        result = read_all(path, expected, older)
        out[result] += 1
        assert not result.startswith("crash"), f"run {run}, WAL byte {pos}: {result}"
        assert not result.startswith("wrong"), f"run {run}, WAL byte {pos}: {result}"
    return out


def test_wal_file_flips_after_a_crash_are_all_detected(wal_template: Any, tmp_path: Path) -> None:
    # What a crash leaves: the store file, its WAL and its -shm. Every frame of this WAL is
    # committed, so every flip either is detected or lands in bytes no read depends on.
    out = wal_flips(wal_template, tmp_path, with_shm=True, seed=12)
    print(f"\nWAL file (with the crash-time -shm): {sum(out.values())} flips: {out.line()}")
    assert out["rolled back"] == 0, out.line()
    assert out["detected"] > 0.9 * sum(out.values()), out.line()


def test_wal_file_flips_without_shm(wal_template: Any, tmp_path: Path) -> None:
    # A WAL copied without its -shm: damage in the final commit frame looks exactly like a
    # transaction torn by a crash (see localstore.walcheck); anything earlier is detected.
    _main, wal, _, _ = wal_template
    out = wal_flips(wal_template, tmp_path, with_shm=False, seed=13)
    frames = (len(wal) - 32) // (4096 + 24)
    print(f"\nWAL file (no -shm): {sum(out.values())} flips: {out.line()} ({frames} frames)")
    # Only flips in the last frame can roll back: about 1/frames of them, allow 3x for chance.
    assert out["rolled back"] <= max(3, 3 * sum(out.values()) / frames), out.line()
    assert out["detected"] > 0.9 * sum(out.values()), out.line()


# -- stored values --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("values")
    rows = make_rows(1100, 3)  # about 500 KB of notes: enough to train a dictionary
    # No page checksums: these campaigns test the values' own checks (tags, CRCs, zstd), which
    # page checksums would otherwise pre-empt for flips made in the file.
    build(root / "store.db", rows, train=True, checksums=False)
    with ls.open(root / "store.db", key=KEY) as store:
        coll = store.collection("things")
        coll.put_many(rows)  # written again, now through the trained dictionary
        uses = store._db.execute("SELECT count(*) FROM things WHERE substr(note, 1, 1) = x'02'").fetchone()[0]
        assert uses > len(rows) // 2, f"only {uses} notes use the dictionary"
        current = {r["id"]: r for r in coll.find()}
    return root / "store.db", [current[r["id"]] for r in rows] + [current["trigger"]]


@pytest.fixture
def raw(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> Iterator[tuple[Path, apsw.Connection]]:
    path = tmp_path / "store.db"
    shutil.copy(trained[0], path)
    conn = apsw.Connection(str(path))
    conn.create_scalar_function("ls_pack", pack_values, deterministic=True)
    try:
        yield path, conn
    finally:
        conn.close()


def value_campaign(path: Path, conn: apsw.Connection, rows: list[dict[str, Any]], fields: list[str],
                   count: int, seed: int, *, keep_going: bool = False) -> tuple[Outcomes, list[str]]:
    """Flip one byte of one stored value per run, read the row through the API, put the value back."""
    rng = random.Random(seed)
    out = Outcomes()
    crashes: list[str] = []
    by_id = {r["id"]: r for r in rows}
    with ls.open(path, key=KEY) as store:
        coll = store.collection("things")
        for run in range(count):
            key = rng.choice(list(by_id))
            field = rng.choice(fields)
            (stored,) = conn.execute(f'SELECT "{field}" FROM things WHERE id = ?', (key,)).fetchone()
            data = bytearray(stored)
            pos = rng.randrange(len(data))
            flip(data, pos, rng)
            conn.execute(f'UPDATE things SET "{field}" = ? WHERE id = ?', (bytes(data), key))
            try:
                row = coll.get(key)
            except ls.LocalStoreError as exc:
                out[f"detected ({type(exc).__name__})"] += 1
            except Exception as exc:
                out[f"crash {type(exc).__name__}"] += 1
                crashes.append(f"{field} of {key}, byte {pos}/{len(data)}: {exc!r}")
                if not keep_going:
                    raise AssertionError(crashes[-1]) from exc
            else:
                if same(row, by_id[key]):
                    out["harmless"] += 1
                else:
                    out[f"wrong {field}"] += 1
            conn.execute(f'UPDATE things SET "{field}" = ? WHERE id = ?', (stored, key))
        assert same(coll.get(key), by_id[key])
    return out, crashes


def test_ciphertext_flips_are_always_detected(raw: tuple[Path, apsw.Connection],
                                              trained: tuple[Path, list[dict[str, Any]]]) -> None:
    path, conn = raw
    out, _ = value_campaign(path, conn, trained[1], ["secret", "both"], runs(400), 21)
    print(f"\nciphertexts: {sum(out.values())} flips: {out.line()}")
    assert set(out) <= {"detected (TamperedValueError)", "detected (MissingKeyError)", "detected (CryptoError)"}, out
    with ls.open(path, key=KEY) as store:
        assert store.verify().ok


@pytest.fixture(scope="module")
def compressed_outcomes(trained: tuple[Path, list[dict[str, Any]]],
                        tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcomes, list[str]]:
    path = tmp_path_factory.mktemp("compressed") / "store.db"
    shutil.copy(trained[0], path)
    conn = apsw.Connection(str(path))
    conn.create_scalar_function("ls_pack", pack_values, deterministic=True)
    try:
        out, crashes = value_campaign(path, conn, trained[1], ["note", "arr"], runs(400), 22, keep_going=True)
    finally:
        conn.close()
    print(f"\ncompressed values: {sum(out.values())} flips: {out.line()}")
    return out, crashes


def test_compressed_value_flips_are_detected(compressed_outcomes: tuple[Outcomes, list[str]]) -> None:
    out, _ = compressed_outcomes
    assert out["detected (CodecError)"] > 0, out.line()


def test_compressed_value_flips_never_crash(compressed_outcomes: tuple[Outcomes, list[str]]) -> None:
    _, crashes = compressed_outcomes
    assert not crashes, f"{len(crashes)} crashes:\n" + "\n".join(crashes[:10])


@pytest.mark.parametrize("field", ["arr", "note"])
def test_compressed_header_flips_never_crash(raw: tuple[Path, apsw.Connection],
                                             trained: tuple[Path, list[dict[str, Any]]], field: str) -> None:
    """Every byte of the first 48 of compressed values, flipped four ways: an error or the right value."""
    path, conn = raw
    crashes, wrong = [], []
    with ls.open(path, key=KEY) as store:
        coll = store.collection("things")
        for row in trained[1][5:8]:
            (stored,) = conn.execute(f"SELECT {field} FROM things WHERE id = ?", (row["id"],)).fetchone()
            for pos in range(min(48, len(stored))):
                for mask in (0x01, 0x10, 0x80, 0xFF):
                    data = bytearray(stored)
                    data[pos] ^= mask
                    conn.execute(f"UPDATE things SET {field} = ? WHERE id = ?", (bytes(data), row["id"]))
                    try:
                        got = coll.get(row["id"])
                    except ls.LocalStoreError:
                        continue
                    except Exception as exc:  # noqa: BLE001
                        crashes.append(f"{row['id']} byte {pos} ^ {mask:#x}: {exc!r}")
                        continue
                    if not same(got, row):
                        wrong.append(f"{row['id']} byte {pos} ^ {mask:#x}")
            conn.execute(f"UPDATE things SET {field} = ? WHERE id = ?", (stored, row["id"]))
    assert not crashes, f"{len(crashes)} crashes:\n" + "\n".join(crashes[:10])
    assert not wrong, f"{len(wrong)} wrong values:\n" + "\n".join(wrong[:10])


def test_compressed_value_flips_never_return_a_wrong_value(compressed_outcomes: tuple[Outcomes, list[str]]) -> None:
    out, _ = compressed_outcomes
    assert not any(k.startswith("wrong") for k in out), out.line()


def dictionary_flip_campaign(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path, count: int) -> Outcomes:
    src, rows = trained
    conn = apsw.Connection(str(src), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        dicts = [bytes(r[0]) for r in conn.execute("SELECT dict FROM _ls_dicts")]
    finally:
        conn.close()
    original = src.read_bytes()
    rng = random.Random(31)
    sample = rng.sample(rows, 40)
    out = Outcomes()
    for run in range(count):
        blob = rng.choice(dicts)
        at = rng.randrange(len(blob) - 32)
        chunk = blob[at: at + 32]
        where = original.find(chunk)
        if where < 0 or original.find(chunk, where + 1) >= 0:
            continue  # the chunk straddles a page boundary, or is not unique
        data = bytearray(original)
        pos = where + rng.randrange(32)
        flip(data, pos, rng)
        path = tmp_path / f"d{run % 4}.db"
        path.write_bytes(bytes(data))
        result = read_all(path, {r["id"]: r for r in sample}, every_key=False)
        out[result] += 1
    return out


def test_dictionary_flips_never_crash(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    out = dictionary_flip_campaign(trained, tmp_path, runs(150))
    print(f"\ndictionaries: {sum(out.values())} flips: {out.line()}")
    assert sum(out.values()) > runs(150) // 2
    assert not any(k.startswith("crash") for k in out), out.line()


def test_dictionary_flips_never_return_a_wrong_value(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    out = dictionary_flip_campaign(trained, tmp_path, runs(150))
    assert not any(k.startswith("wrong") for k in out), out.line()


# -- verify names the damage; a backup restores ---------------------------------------------------


def test_verify_names_the_damage_and_a_backup_restores(tmp_path: Path) -> None:
    rows = make_rows(200, 4)
    path = tmp_path / "store.db"
    with ls.open(path, key=KEY) as store:
        store.collection("things", key="id", fields=FIELDS).put_many(rows)
        store.backup(tmp_path / "backup.db")
    data = bytearray(path.read_bytes())
    # Damage the b-tree pages of the index on n (their page type byte): integrity_check names it.
    conn = apsw.Connection(str(tmp_path / "backup.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        index = conn.execute("SELECT name, rootpage FROM sqlite_schema WHERE type='index' AND tbl_name='things' "
                             "AND sql IS NOT NULL").fetchone()
    finally:
        conn.close()
    assert index is not None
    _, root = index
    data[(root - 1) * page] = 0x0D if data[(root - 1) * page] != 0x0D else 0x05
    path.write_bytes(bytes(data))
    with ls.open(path, key=KEY) as store:
        try:
            report = store.verify()
        except ls.CorruptStoreError:
            pass  # detected; test_verify_reports_a_damaged_index_by_name asks for a report naming it
        else:
            assert not report.ok
    # Restore: the backup replaces the damaged file and reads back everything.
    shutil.copy(tmp_path / "backup.db", path)
    with ls.open(path, key=KEY) as store:
        assert store.verify().ok
        coll = store.collection("things")
        assert all(same(coll.get(r["id"]), r) for r in rows)


def test_verify_reports_a_damaged_index_by_name(tmp_path: Path) -> None:
    rows = make_rows(200, 4)
    path = tmp_path / "store.db"
    with ls.open(path, key=KEY, checksums=False) as store:  # with them, the page checksum fails first
        store.collection("things", key="id", fields=FIELDS).put_many(rows)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        name, root = conn.execute("SELECT name, rootpage FROM sqlite_schema WHERE name = '_ls_ix.things.n'").fetchone()
    finally:
        conn.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * page] = 0x0D  # an index page now claims to be a table leaf
    path.write_bytes(bytes(data))
    with ls.open(path, key=KEY) as store:
        report = store.verify()
    assert not report.ok
    assert any(name in p for p in report.problems), report.problems


# -- opt-in page checksums (localstore.checksums, SQLite's cksumvfs) -------------------------------

# Run in a child process: loading cksumvfs makes it the default VFS of the whole process.
CHECKSUM_CAMPAIGN = r"""
import json, random, sys
from collections import Counter
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_corruption as tc
import localstore as ls
from localstore import checksums

root, random_flips, aimed_flips = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = tc.make_rows(120, 1)
expected = {r["id"]: r for r in rows}
checksums.create(root / "checked.db")
with ls.open(root / "checked.db", key=tc.KEY, vfs=checksums.register()) as store:
    store.collection("things", key="id", fields=tc.FIELDS).put_many(rows)
with ls.open(root / "unchecked.db", key=tc.KEY, vfs="unix") as store:  # the control: no reserved bytes
    store.collection("things", key="id", fields=tc.FIELDS).put_many(rows)
assert checksums.enabled(root / "checked.db") and not checksums.enabled(root / "unchecked.db")

def campaign(name, count, seed, aimed):
    original = (root / name).read_bytes()
    spots = [i for i in range(len(original)) if original.startswith(b"plain value ", i)]
    rng = random.Random(seed)
    out = Counter()
    for run in range(count):
        data = bytearray(original)
        pos = rng.choice(spots) + rng.randrange(12, 15) if aimed else rng.randrange(len(data))
        tc.flip(data, pos, rng)
        path = root / f"run{run % 4}.db"
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.write_bytes(bytes(data))
        result = tc.read_all(path, expected)
        out[result.split(":")[0] if result.startswith("crash") else result] += 1
    return dict(out)

print(json.dumps({
    "checked, random": campaign("checked.db", random_flips, 41, False),
    "checked, aimed": campaign("checked.db", aimed_flips, 42, True),
    "unchecked, aimed": campaign("unchecked.db", aimed_flips, 42, True),
}))
"""


def test_page_checksums_detect_flips_in_plain_values(tmp_path: Path) -> None:
    """With checksums.create + vfs=checksums.register(), a flipped byte in a plain Text value is detected."""
    import json
    import subprocess
    import sys

    from localstore import checksums

    if not checksums.available():
        pytest.skip("this apsw ships no cksumvfs")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted below, with stderr
        [sys.executable, "-c", CHECKSUM_CAMPAIGN, str(tests), str(tmp_path), str(runs(200)), str(runs(60))],
        capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name, counts in out.items():
        print(f"\npage checksums, {name}: {sum(counts.values())} flips: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    # The control shows the aimed flips do change plain values when nothing checks the pages...
    assert any(k.startswith("wrong") for k in out["unchecked, aimed"]), out["unchecked, aimed"]
    # ...and with checksums every one of them is detected, and no random flip reads back wrong.
    assert out["checked, aimed"] == {"detected": runs(60)}, out["checked, aimed"]
    assert not [k for k in out["checked, random"] if k.startswith(("wrong", "crash"))], out["checked, random"]


CHECKSUM_LIFECYCLE = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import apsw
import test_corruption as tc
import localstore as ls
from localstore import checksums

root = Path(sys.argv[2])
rows = tc.make_rows(50, 5)
old = root / "old.db"
with ls.open(old, key=tc.KEY, vfs="unix") as store:
    store.collection("things", key="id", fields=tc.FIELDS).put_many(rows)
vfs = checksums.register()
conn = apsw.Connection(str(old), vfs=vfs)
try:
    checksums.prepare(conn, str(old))
    raise SystemExit("prepare accepted a file without checksums")
except ls.StoreOpenError as exc:
    assert "checksums.convert" in str(exc), exc
finally:
    conn.close()
checksums.convert(old)
assert checksums.enabled(old)
with ls.open(old, key=tc.KEY) as store:
    assert store.verify().ok
    assert all(tc.same(store.collection("things").get(r["id"]), r) for r in rows)
    store.backup(root / "backup.db")
assert checksums.enabled(root / "backup.db")
with ls.open(root / "backup.db", key=tc.KEY) as backup:  # every page read through the shim: checksums valid
    assert backup.verify().ok and backup.collection("things").count() == len(rows)
print("ok")
"""


def test_page_checksums_convert_an_existing_store_and_survive_backups(tmp_path: Path) -> None:
    import subprocess
    import sys

    from localstore import checksums

    if not checksums.available():
        pytest.skip("this apsw ships no cksumvfs")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted below, with stderr
        [sys.executable, "-c", CHECKSUM_LIFECYCLE, str(tests), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:] + done.stdout
