"""Compressed fields: zstd per value, trained dictionaries, raw values, numpy arrays."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest
from conftest import PYTHON, ROOT

import localstore as ls
from localstore import dictionaries

sys.path.insert(0, str(ROOT / "benchmarks"))
from _harness import english_text

KEY = ls.generate_key()


def _memories(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"m{seed}-{i}", "text": english_text(rng, 330),
         "meta": {"kind": rng.choice(["observation", "reflection", "plan"]), "importance": round(rng.random(), 3)}}
        for i in range(n)
    ]


def _declare(store: ls.Store, **text_options: Any) -> ls.Collection:
    return store.collection("memories", key="id", fields={
        "id": ls.Text(), "text": ls.Text(compress=True, **text_options), "meta": ls.Json(compress=True),
    })


def _column(path: Path, sql: str) -> list[Any]:
    conn = apsw.Connection(str(path))
    try:
        return [r[0] for r in conn.execute(sql)]
    finally:
        conn.close()


def _dicts(path: Path) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(path))
    try:
        if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name='_ls_dicts'").fetchone():
            return []
        return conn.execute("SELECT id, coll, field, size, ratio FROM _ls_dicts ORDER BY id").fetchall()
    finally:
        conn.close()


def test_dictionary_training_kicks_in_and_beats_plain_zstd(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "s.db"
    rows = _memories(4000)
    with ls.open(path) as store:
        memories = _declare(store)
        memories.put_many(rows[:500])
        assert _dicts(path) == []  # too few samples yet: plain zstd
        for start in range(500, 4000, 500):
            memories.put_many(rows[start : start + 500])
        assert memories.find() == rows
    made = _dicts(path)
    assert made and all(d[1:3] == ("memories", "text") for d in made)
    assert all(dictionaries.FIRST_DICT_ID <= d[0] <= dictionaries.LAST_DICT_ID for d in made)
    flags = _column(path, "SELECT substr(text, 1, 1) FROM memories ORDER BY rowid")
    assert flags[0] == b"\x01" and flags[-1] == b"\x02"  # first rows plain zstd, last ones with a dictionary
    stored = _column(path, "SELECT text FROM memories ORDER BY rowid")
    raw = [r["text"].encode() for r in rows]
    tail_ratio = sum(map(len, raw[-500:])) / sum(map(len, stored[-500:]))
    head_ratio = sum(map(len, raw[:500])) / sum(map(len, stored[:500]))
    assert tail_ratio > head_ratio * 1.3
    # and in a fresh process, dictionaries come from the file
    script = (
        "import localstore as ls, sys, json\n"
        "rows = ls.open(sys.argv[1]).collection('memories').find()\n"
        "print(json.dumps(rows))\n"
    )
    out = subprocess.run([PYTHON, "-c", script, str(path)], env=subprocess_env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == rows


def test_retraining_when_the_ratio_drops_keeps_old_values_readable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    english = _memories(3000)
    rng = random.Random(5)
    other = [{"id": f"h{i}", "text": " ".join(f"{rng.getrandbits(64):016x}" for _ in range(25)), "meta": [i]} for i in range(6000)]
    with ls.open(path) as store:
        memories = _declare(store)
        for start in range(0, 3000, 500):
            memories.put_many(english[start : start + 500])
        first = _dicts(path)
        assert len(first) >= 1
        for start in range(0, 6000, 500):
            memories.put_many(other[start : start + 500])
        later = _dicts(path)
        assert len(later) > len(first)
        assert memories.find() == english + other
    conn = apsw.Connection(str(path))
    used = {r[0] for r in conn.execute("SELECT DISTINCT substr(text, 2, 4) FROM memories WHERE substr(text, 1, 1) = x'02'")}
    conn.close()
    assert len(used) >= 2  # values under several dictionaries, all decodable
    with ls.open(path) as store:
        assert store.collection("memories").find() == english + other


def test_dictionaries_are_immutable_and_missing_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = _memories(3000)
    with ls.open(path) as store:
        memories = _declare(store)
        for start in range(0, 3000, 500):
            memories.put_many(rows[start : start + 500])
    conn = apsw.Connection(str(path))
    for sql in ("UPDATE _ls_dicts SET ratio = 0", "DELETE FROM _ls_dicts"):
        with pytest.raises(apsw.ConstraintError, match="localstore dictionaries"):
            conn.execute(sql)
    conn.execute("DROP TRIGGER _ls_dicts_no_delete; DELETE FROM _ls_dicts")  # what a careless copy might do
    conn.close()
    with ls.open(path) as store:
        memories = store.collection("memories")
        assert memories.get(rows[0]["id"]) == rows[0]  # plain zstd values need no dictionary
        with pytest.raises(ls.MissingDictionaryError) as info:
            memories.get(rows[-1]["id"])
        for part in (str(path), "'memories'", "'text'", repr(rows[-1]["id"])):
            assert part in str(info.value)
        with pytest.raises(ls.MissingDictionaryError):
            memories.find()


def _crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def test_values_that_do_not_shrink_are_stored_raw_with_a_checksum(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rng = random.Random(3)
    with ls.open(path) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "b": ls.Blob(compress=True), "t": ls.Text(compress=True)})
        values = [bytes(rng.getrandbits(8) for _ in range(300)), b"tiny", b"a" * 300]
        coll.put_many([{"id": i, "b": v, "t": v.decode("latin-1")} for i, v in enumerate(values)])
        assert [r["b"] for r in coll.find()] == values
        assert [r["t"] for r in coll.find()] == [v.decode("latin-1") for v in values]
    stored = _column(path, "SELECT b FROM c ORDER BY id")
    assert stored[0] == b"\x04" + values[0] + _crc(values[0])
    assert stored[1] == b"\x04tiny" + _crc(b"tiny")
    assert stored[2][:1] == b"\x01" and len(stored[2]) < 40


def test_every_damaged_byte_of_a_raw_value_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    value = random.Random(4).randbytes(200)
    with ls.open(path) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "b": ls.Blob(compress=True)})
        coll.put({"id": 1, "b": value})
    stored = _column(path, "SELECT b FROM c")[0]
    conn = apsw.Connection(str(path))
    outcomes: dict[str, int] = {}
    with ls.open(path) as store:
        coll = store.collection("c")
        for pos in range(len(stored)):  # the flag too: 0x04 ^ 0x04 is the older, unchecked 0x00
            for mask in (0x01, 0x02, 0x04, 0x10, 0x80, 0xFF):
                damaged = bytearray(stored)
                damaged[pos] ^= mask
                conn.execute("UPDATE c SET b = ? WHERE id = 1", (bytes(damaged),))
                try:
                    got = coll.get(1)
                except ls.CodecError as exc:
                    assert "'c'" in str(exc) and "'b'" in str(exc) and "restore the row" in str(exc)
                    outcomes["detected"] = outcomes.get("detected", 0) + 1
                else:
                    outcomes["wrong" if got != {"id": 1, "b": value} else "same"] = 1
        conn.execute("UPDATE c SET b = ? WHERE id = 1", (stored,))
        assert coll.get(1) == {"id": 1, "b": value}
    conn.close()
    assert outcomes == {"detected": len(stored) * 6}


def _legacy_numbers(array: np.ndarray) -> bytes:
    """An Array value in the previous 0x03 form, built from the format description."""
    import zstandard

    encoded = ls.Array().encode(array)
    cut = 6 + int.from_bytes(encoded[4:6], "little")
    prefix, body = encoded[:cut], encoded[cut:]
    size = array.dtype.itemsize if body else 1  # the old writer did not shuffle empty data
    shuffled = np.frombuffer(body, np.uint8).reshape(-1, size).T.tobytes() if size > 1 else body
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(shuffled)
    return b"\x03" + bytes([size]) + len(prefix).to_bytes(4, "big") + prefix + frame


def test_values_in_the_previous_format_stay_readable(tmp_path: Path) -> None:
    """Files written before raw values had a checksum (0x00) and numbers one frame (0x03) still read."""
    path = tmp_path / "s.db"
    arrays = [np.linspace(0, 1, 600).astype("<f4"), np.arange(24, dtype=">i8").reshape(2, 3, 4),
              np.zeros(0, dtype="<f2"), np.array([True, False] * 40)]
    with ls.open(path) as store:
        coll = store.collection("c", key="id", fields={
            "id": ls.Integer(), "b": ls.Blob(compress=True), "t": ls.Text(compress=True), "a": ls.Array(compress=True)})
        coll.put_many([{"id": i, "b": b"new", "t": "new", "a": a} for i, a in enumerate(arrays)])
    conn = apsw.Connection(str(path))
    for i, a in enumerate(arrays):
        conn.execute("UPDATE c SET b = ?, t = ?, a = ? WHERE id = ?",
                     (b"\x00" + bytes([i]) * 40, b"\x00" + f"old text {i}".encode(), _legacy_numbers(a), i))
    conn.close()
    with ls.open(path) as store:
        coll = store.collection("c")
        for i, a in enumerate(arrays):
            row = coll.get(i)
            assert row is not None and row["b"] == bytes([i]) * 40 and row["t"] == f"old text {i}"
            assert row["a"].dtype == a.dtype and row["a"].shape == a.shape and np.array_equal(row["a"], a)
        coll.put({"id": 0, "b": bytes([0]) * 40, "t": "old text 0", "a": arrays[0]})  # rewritten in the new form
    assert _column_rows(path, "SELECT substr(b, 1, 1), substr(a, 1, 1) FROM c WHERE id = 0") == [(b"\x01", b"\x05")]


def test_a_damaged_array_header_in_the_previous_format_is_caught_by_its_cross_checks(tmp_path: Path) -> None:
    """0x03 values have no checksum over their header; the item size must still agree with the dtype."""
    path = tmp_path / "s.db"
    array = np.linspace(0, 1, 600).astype("<f4")
    with ls.open(path) as store:
        store.collection("c", key="id", fields={"id": ls.Integer(), "a": ls.Array(compress=True)}).put({"id": 1, "a": array})
    legacy = bytearray(_legacy_numbers(array))
    conn = apsw.Connection(str(path))
    with ls.open(path) as store:
        coll = store.collection("c")
        for itemsize in (1, 2, 8):  # a damaged item-size byte would unshuffle into a wrong array
            legacy[1] = itemsize
            conn.execute("UPDATE c SET a = ? WHERE id = 1", (bytes(legacy),))
            with pytest.raises(ls.CodecError, match="item size"):
                coll.get(1)
    conn.close()


def test_every_damaged_byte_of_a_compressed_array_is_detected(tmp_path: Path) -> None:
    """0x05: one zstd frame holds the dtype/shape header and the data, so its checksum covers both."""
    path = tmp_path / "s.db"
    array = np.cumsum(np.random.default_rng(5).standard_normal(200)).astype("<f4").reshape(20, 10)
    with ls.open(path) as store:
        store.collection("c", key="id", fields={"id": ls.Integer(), "a": ls.Array(compress=True)}).put({"id": 1, "a": array})
    stored = _column(path, "SELECT a FROM c")[0]
    assert stored[:1] == b"\x05"
    conn = apsw.Connection(str(path))
    wrong = []
    with ls.open(path) as store:
        coll = store.collection("c")
        for pos in range(1, len(stored)):
            for mask in (0x01, 0x04, 0x10, 0x80, 0xFF):
                damaged = bytearray(stored)
                damaged[pos] ^= mask
                conn.execute("UPDATE c SET a = ? WHERE id = 1", (bytes(damaged),))
                try:
                    got = coll.get(1)["a"]  # type: ignore[index]
                except ls.CodecError:
                    continue
                if not (got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)):
                    wrong.append((pos, mask))
    conn.close()
    assert wrong == []


def test_incompressible_values_are_probed_and_stored_raw_without_compressing(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 2**32, 16384, dtype=np.uint32).view("<f4")  # random bits: nothing to gain
    normal = rng.standard_normal(16384).astype("<f4")  # shrinks by about 8% once byte-shuffled
    half = np.concatenate([noise[:8192], np.zeros(8192, "<f4")])  # noise, then zeros: the probe must see both
    blob = rng.bytes(40_000)
    with ls.open(tmp_path / "s.db") as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "a": ls.Array(compress=True), "b": ls.Blob(compress=True)})
        coll.put({"id": 0, "a": None, "b": None})
        probed = [coll._codec.fields[f].compressor for f in ("a", "b")]  # type: ignore[union-attr]
        coll.put({"id": 1, "a": noise, "b": blob})
        assert [c.probed_raw for c in probed] == [1, 1]  # type: ignore[union-attr]
        coll.put_many([{"id": 2, "a": normal, "b": blob[:1000] * 40}, {"id": 3, "a": half, "b": None}])
        assert [c.probed_raw for c in probed] == [1, 1]  # type: ignore[union-attr]  # neither was taken for noise
        for i, want in ((1, noise), (2, normal), (3, half)):
            got = coll.get(i)["a"]  # type: ignore[index]
            assert got.dtype == want.dtype and np.array_equal(got.view("<u4"), want.view("<u4"))
        assert coll.get(1)["b"] == blob and coll.get(2)["b"] == blob[:1000] * 40  # type: ignore[index]
    stored = {r[0]: r[1:] for r in _column_rows(tmp_path / "s.db", "SELECT id, a, b FROM c")}
    assert stored[1][0][:1] == b"\x04" and stored[1][1] == b"\x04" + blob + _crc(blob)
    assert stored[2][0][:1] == b"\x05" and len(stored[2][0]) < normal.nbytes * 0.95
    assert stored[2][1][:1] == b"\x01" and len(stored[2][1]) < 2000
    assert stored[3][0][:1] == b"\x05" and len(stored[3][0]) < half.nbytes * 0.6


def _column_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(path))
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


ARRAYS = [
    np.linspace(0, 1, 5000).reshape(50, 100),
    np.sin(np.arange(4096, dtype="<f4") / 50),
    np.arange(1000, dtype=">i8"),
    np.zeros((0, 3), dtype="<f2"),
    np.array(3.5),
    np.array([True, False] * 300),
    (np.arange(200) + 1j * np.arange(200)).astype("<c16"),
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4)[:, ::2],  # not contiguous
    np.random.default_rng(1).standard_normal(3000).astype("<f8"),
]


@pytest.mark.parametrize("encrypt", [False, True])
def test_numpy_arrays_keep_dtype_and_shape(tmp_path: Path, encrypt: bool) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "a": ls.Array(compress=True, encrypt=encrypt)})
        coll.put_many([{"id": i, "a": a} for i, a in enumerate(ARRAYS)])
        for i, a in enumerate(ARRAYS):
            got = coll.get(i)["a"]  # type: ignore[index]
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
            got[...] = 0  # writable
    sizes = _column(path, "SELECT length(a) FROM c ORDER BY id")
    assert sizes[0] < ARRAYS[0].nbytes * 0.6  # smooth float64: byte shuffling makes it compress
    assert sizes[2] < ARRAYS[2].nbytes * 0.3


def test_encrypted_fields_use_plain_zstd_and_never_train(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = _memories(3000)
    with ls.open(path, key=KEY) as store:
        memories = _declare(store, encrypt=True)
        for start in range(0, 3000, 500):
            memories.put_many(rows[start : start + 500])
        assert memories.find() == rows
    assert [d[2] for d in _dicts(path)] in ([], ["meta"], ["meta", "meta"])  # never "text"
    stored = _column(path, "SELECT text FROM memories")
    assert sum(map(len, stored)) < sum(len(r["text"].encode()) for r in rows) / 1.15  # compressed, then encrypted


def test_compressed_fields_refuse_where_and_order_by(tmp_path: Path) -> None:
    with ls.open(tmp_path / "s.db") as store:
        memories = _declare(store)
        memories.put(_memories(1)[0])
        with pytest.raises(ls.QueryError, match="compressed"):
            memories.find(where={"text": "x"})
        with pytest.raises(ls.QueryError, match="compressed"):
            memories.find(order_by="text")
        change = store.changelog.changes()[0]
        assert memories.decode_payload(change.payload) == _memories(1)[0]  # type: ignore[arg-type]


def test_dictionary_table_layout_is_stable(tmp_path: Path) -> None:
    """The sync engine reads ``_ls_dicts`` directly; its columns are a contract (docs/privacy.md)."""
    path = tmp_path / "s.db"
    rows = _memories(3000)
    with ls.open(path) as store:
        memories = _declare(store)
        for start in range(0, 3000, 500):
            memories.put_many(rows[start : start + 500])
    conn = apsw.Connection(str(path))
    columns = [r[1] for r in conn.execute("PRAGMA table_info(_ls_dicts)")]
    blob, dict_id = conn.execute("SELECT dict, id FROM _ls_dicts LIMIT 1").fetchone()
    conn.close()
    assert columns == ["id", "coll", "field", "created_hlc", "size", "samples", "sample_bytes", "ratio", "level", "dict"]
    import zstandard

    assert zstandard.ZstdCompressionDict(blob).dict_id() == dict_id


def test_bad_text_in_a_compressed_field_writes_nothing(tmp_path: Path) -> None:
    with ls.open(tmp_path / "s.db", key=KEY) as store:
        for options in ({"compress": True}, {"encrypt": True, "compress": True}):
            coll = store.collection(f"c{len(options)}", key="id", fields={"id": ls.Text(), "t": ls.Text(**options)})
            with pytest.raises(ls.ValidationError, match="surrogate"):
                coll.put_many([{"id": "ok", "t": "fine"}, {"id": "bad", "t": "a\ud800b"}])
            assert coll.count() == 0


def test_threads_decode_dictionary_and_encrypted_values_together(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "s.db"
    rows = _memories(3000)
    with ls.open(path, key=KEY) as store:
        memories = _declare(store)
        secret = store.collection("secret", key="id", fields={"id": ls.Text(), "text": ls.Text(encrypt=True, compress=True)})
        for start in range(0, 3000, 500):
            memories.put_many(rows[start : start + 500])
            secret.put_many([{"id": r["id"], "text": r["text"]} for r in rows[start : start + 500]])
        assert _dicts(path)
        errors: list[BaseException] = []

        def read(offset: int) -> None:
            try:
                for i in range(offset, 3000, 7):
                    key = rows[i]["id"]
                    assert memories.get(key) == rows[i]
                    assert secret.get(key) == {"id": key, "text": rows[i]["text"]}
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_large_values_of_an_encrypted_compressed_field_round_trip(tmp_path: Path) -> None:
    """Values of DEFAULT_PROBE_BYTES or more leave the fused encoder for the probing one; both read back."""
    rng = random.Random(8)
    noisy = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(8000))  # 24 KB of UTF-8, little to gain
    plain = english_text(rng, 30_000)
    assert len(noisy.encode()) >= dictionaries.DEFAULT_PROBE_BYTES <= len(plain.encode())
    with ls.open(tmp_path / "s.db", key=KEY) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "t": ls.Text(encrypt=True, compress=True)})
        coll.put_many([{"id": 1, "t": noisy}, {"id": 2, "t": plain}, {"id": 3, "t": "short"}])
        assert [r["t"] for r in coll.find(order_by="id")] == [noisy, plain, "short"]
    sizes = _column(tmp_path / "s.db", "SELECT length(t) FROM c ORDER BY id")
    assert sizes[1] < len(plain.encode()) * 0.7  # still compressed before encryption


def test_rewrite_unchecked_moves_older_values_to_the_checked_forms(tmp_path: Path) -> None:
    from localstore.codecs import rewrite_unchecked

    path = tmp_path / "s.db"
    arrays = [np.linspace(0, i, 300).astype("<f4") for i in range(5)]
    with ls.open(path, key=KEY) as store:
        coll = store.collection("c", key="id", fields={
            "id": ls.Integer(), "b": ls.Blob(compress=True), "a": ls.Array(compress=True),
            "s": ls.Text(encrypt=True, compress=True)})
        coll.put_many([{"id": i, "b": b"new", "a": a, "s": "secret"} for i, a in enumerate(arrays)])
    conn = apsw.Connection(str(path))
    for i in (1, 3):
        conn.execute("UPDATE c SET b = ?, a = ? WHERE id = ?", (b"\x00old", _legacy_numbers(arrays[i]), i))
    conn.close()
    with ls.open(path, key=KEY) as store:
        assert rewrite_unchecked(store, batch=1) == 2
        assert rewrite_unchecked(store, batch=1) == 0  # nothing older is left
        coll = store.collection("c")
        for i, a in enumerate(arrays):
            row = coll.get(i)
            assert row is not None and row["b"] == (b"old" if i in (1, 3) else b"new") and row["s"] == "secret"
            assert np.array_equal(row["a"], a)
    flags = _column_rows(path, "SELECT substr(b, 1, 1), substr(a, 1, 1) FROM c WHERE id IN (1, 3)")
    assert flags == [(b"\x04", b"\x05")] * 2


def test_damaged_values_names_each_damaged_value(tmp_path: Path) -> None:
    from localstore.codecs import damaged_values

    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("c", key="id", fields={
            "id": ls.Integer(), "b": ls.Blob(compress=True), "s": ls.Text(encrypt=True), "p": ls.Text()})
        coll.put_many([{"id": i, "b": bytes([i]) * 30, "s": f"secret {i}", "p": "plain"} for i in range(20)])
        assert damaged_values(store) == []
    conn = apsw.Connection(str(path))
    for column, key in (("b", 4), ("s", 11)):
        (stored,) = conn.execute(f"SELECT {column} FROM c WHERE id = ?", (key,)).fetchone()
        damaged = bytearray(stored)
        damaged[len(damaged) // 2] ^= 0x20
        conn.execute(f"UPDATE c SET {column} = ? WHERE id = ?", (bytes(damaged), key))
    conn.close()
    with ls.open(path, key=KEY) as store:
        problems = damaged_values(store)
    assert len(problems) == 2
    assert "field 'b', key 4" in problems[0] and "field 's', key 11" in problems[1]
    with ls.open(path) as store:  # without the master key, encrypted values cannot be checked
        problems = damaged_values(store)
    assert len(problems) == 1 and "field 'b', key 4" in problems[0]
