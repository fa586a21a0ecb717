"""Encrypted fields: round trips, binding to their place, tamper detection, canary scans, blind indexes."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest
from conftest import PYTHON

import localstore as ls
from localstore import crypto

KEY = ls.generate_key()

VALUES: dict[str, tuple[Any, Any]] = {
    # type name -> (field factory, value)
    "Text": (ls.Text, "the quick brown fox " * 8),
    "Integer": (ls.Integer, -(2**62) + 7),
    "Real": (ls.Real, 3.141592653589793),
    "Boolean": (ls.Boolean, True),
    "Json": (ls.Json, {"goal": "learn", "steps": [1, 2, 3], "nested": {"x": None}}),
    "Blob": (ls.Blob, bytes(range(256)) * 3),
    "Array": (ls.Array, np.arange(60, dtype="<f4").reshape(3, 4, 5)),
}
OPTIONS = {"encrypt": {"encrypt": True}, "compress": {"compress": True}, "both": {"encrypt": True, "compress": True}}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return bool(a == b) and type(a) is type(b)


def _raw(path: Path, table: str, column: str, key: Any) -> Any:
    conn = apsw.Connection(str(path))
    try:
        return conn.execute(f'SELECT "{column}" FROM "{table}" WHERE id = ?', (key,)).fetchone()[0]
    finally:
        conn.close()


def _set_raw(path: Path, table: str, column: str, key: Any, value: Any) -> None:
    conn = apsw.Connection(str(path))
    try:
        conn.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE id = ?', (value, key))
    finally:
        conn.close()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("type_name", list(VALUES))
def test_round_trip_every_type(tmp_path: Path, type_name: str, option: str) -> None:
    factory, value = VALUES[type_name]
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("t", key="id", fields={"id": ls.Text(), "v": factory(**OPTIONS[option]), "w": factory(**OPTIONS[option])})
        coll.put({"id": "a", "v": value, "w": None})
        got = coll.get("a")
        assert got is not None and _equal(got["v"], value) and got["w"] is None
        change = store.changelog.changes()[-1]
        assert _equal(coll.decode_payload(change.payload)["v"], value)  # type: ignore[arg-type]
        assert isinstance(change.payload["v"], bytes)  # type: ignore[index]
    with ls.open(path, key=KEY) as store:  # and after reopening, from the schema kept in the file
        got = store.collection("t").get("a")
        assert got is not None and _equal(got["v"], value)


def test_vectors_cannot_be_encrypted_or_compressed(store: ls.Store) -> None:
    for options in OPTIONS.values():
        with pytest.raises(ls.SchemaError, match="Array"):
            store.collection("v", key="id", fields={"id": ls.Text(), "v": ls.Vector(4, **options)})


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"id": ls.Text(encrypt=True), "x": ls.Text()}, "key cannot be encrypted"),
        ({"id": ls.Text(), "x": ls.Text(subject="id")}, "encrypt=True"),
        ({"id": ls.Text(), "x": ls.Text(blind_index=True)}, "encrypt=True"),
        ({"id": ls.Text(), "x": ls.Text(encrypt=True, subject="nope")}, "another field"),
        ({"id": ls.Text(), "x": ls.Text(encrypt=True, subject="x")}, "another field"),
        ({"id": ls.Text(), "p": ls.Json(), "x": ls.Text(encrypt=True, subject="p")}, "plain Text or Integer"),
        ({"id": ls.Text(), "x": ls.Text(encrypt=True, default="secret")}, "default"),
        ({"id": ls.Text(), "x": ls.Text(encrypt=True, index=True)}, "blind_index"),
        ({"id": ls.Text(), "x": ls.Text(compress=True, filter=True)}, "plaintext"),
    ],
)
def test_bad_declarations_are_refused(store: ls.Store, fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ls.SchemaError, match=match):
        store.collection("bad", key="id", fields=fields)
    assert "bad" not in store.collections()


def _people(store: ls.Store) -> ls.Collection:
    return store.collection("people", key="id", fields={
        "id": ls.Text(),
        "owner": ls.Text(),
        "email": ls.Text(encrypt=True, blind_index=True),
        "phone": ls.Text(encrypt=True),
        "notes": ls.Text(encrypt=True, compress=True, subject="owner"),
        "plain": ls.Text(),
    })


def test_swapped_ciphertexts_between_rows_and_fields_fail(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        people = _people(store)
        people.put_many([{"id": k, "owner": "o", "email": f"{k}@x", "phone": f"+{k}"} for k in ("a", "b")])
    a_email, b_email = _raw(path, "people", "email", "a"), _raw(path, "people", "email", "b")
    a_phone = _raw(path, "people", "phone", "a")
    _set_raw(path, "people", "email", "a", b_email)  # b's value in a's row
    _set_raw(path, "people", "phone", "b", a_phone)  # a's phone into b's row
    _set_raw(path, "people", "phone", "a", a_email)  # a's email into a's phone
    with ls.open(path, key=KEY) as store:
        people = store.collection("people")
        for key in ("a", "b"):
            with pytest.raises(ls.TamperedValueError) as info:
                people.get(key)
            message = str(info.value)
            assert str(path) in message and "'people'" in message and repr(key) in message
        with pytest.raises(ls.TamperedValueError, match="'phone'"):
            people.get_many(["b"])
        with pytest.raises(ls.TamperedValueError):
            people.find()  # no partial rows, no skipped rows


def test_swapped_ciphertext_between_stores_fails(tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    for path in (a, b):
        with ls.open(path, key=KEY) as store:
            _people(store).put({"id": "k", "owner": "o", "email": f"{path.stem}@x", "phone": "1"})
    _set_raw(b, "people", "email", "k", _raw(a, "people", "email", "k"))
    with ls.open(b, key=KEY) as store, pytest.raises(ls.TamperedValueError, match="'email'"):
        store.collection("people").get("k")


def test_every_flipped_bit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _people(store).put({"id": "k", "owner": "o", "email": "e@x", "phone": "555-0100", "notes": "note " * 20})
    for column in ("phone", "email", "notes"):
        original = _raw(path, "people", column, "k")
        for position in range(len(original)):
            for bit in (0, 7):
                damaged = bytearray(original)
                damaged[position] ^= 1 << bit
                _set_raw(path, "people", column, "k", bytes(damaged))
                with ls.open(path, key=KEY) as store, pytest.raises((ls.TamperedValueError, ls.MissingKeyError)):
                    store.collection("people").get("k")
        _set_raw(path, "people", column, "k", original)
    with ls.open(path, key=KEY) as store:
        assert store.collection("people").get("k")["phone"] == "555-0100"  # type: ignore[index]


def test_wrong_key_fails_at_open_and_missing_key_names_the_value(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _people(store).put({"id": "k", "owner": "o", "email": "e@x", "phone": "1", "plain": "visible"})
    other = ls.generate_key()
    with pytest.raises(ls.WrongKeyError) as info:
        ls.open(path, key=other)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ls.LocalStoreError)
    assert other not in str(info.value) and KEY not in str(info.value) and str(path) in str(info.value)
    with ls.open(path) as store:  # no key: plain data still readable, encrypted values are not
        people = store.collection("people")
        with pytest.raises(ls.MissingKeyError) as missing:
            people.get("k")
        message = str(missing.value)
        for part in (str(path), "'people'", "'email'", "'k'", "LOCALSTORE_KEY"):
            assert part in message
        assert people.keys() == ["k"]
        with pytest.raises(ls.MissingKeyError):
            people.put({"id": "k2", "owner": "o", "email": "f@x"})
        assert people.count() == 1


def test_master_key_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    raw = base64.b64decode(KEY)
    with ls.open(path, key=KEY) as store:
        _people(store).put_many([{"id": str(i), "owner": "o", "email": f"{i}@x"} for i in range(100)])
        blob = _files(path)
        store.backup(tmp_path / "copy.db")
    blob += (tmp_path / "copy.db").read_bytes() + path.read_bytes()
    assert raw not in blob and KEY.encode() not in blob


def _files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def test_plaintext_canary_scan_of_file_wal_and_backup(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    canary = "CANARY-7f3a9c"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("secrets", key="id", fields={
            "id": ls.Text(),
            "who": ls.Text(),
            "a": ls.Text(encrypt=True),
            "b": ls.Text(encrypt=True, compress=True),
            "c": ls.Text(encrypt=True, blind_index=True),
            "d": ls.Json(encrypt=True, compress=True, subject="who"),
            "e": ls.Blob(encrypt=True),
            "visible": ls.Text(),
        })
        rows = [
            {"id": f"r{i}", "who": f"p{i % 3}", "a": f"{canary} a {i}", "b": f"{canary} b {i} " * 30, "c": canary,
             "d": {"text": f"{canary} d", "n": i}, "e": canary.encode() * 3, "visible": f"PLAIN-{i}"}
            for i in range(300)
        ]
        coll.put_many(rows)
        coll.put_many(rows[:50])  # overwrites: old versions land in the change log
        assert coll.find(where={"c": canary})[0]["a"].startswith(canary)
        live = _files(path)
        assert Path(f"{path}-wal").exists() and Path(f"{path}-wal").stat().st_size > 0
        store.backup(tmp_path / "backup.db")
    backup = (tmp_path / "backup.db").read_bytes()
    after_close = path.read_bytes()
    for blob in (live, backup, after_close):
        assert blob.count(canary.encode()) == 0
        assert blob.count(canary.encode("utf-16-le")) == 0
        assert b"PLAIN-7" in blob  # the scan does see plaintext where there is some


def test_change_log_holds_ciphertext_only(tmp_path: Path) -> None:
    store = ls.open(tmp_path / "s.db", key=KEY)
    people = _people(store)
    people.put({"id": "k", "owner": "o", "email": "secret@example.org", "phone": "1"})
    people.put({"id": "k", "owner": "o", "email": "second@example.org", "phone": "2"})
    changes = store.changelog.changes()
    assert len(changes) == 2
    for change in changes:
        assert b"example.org" not in change.payload["email"]  # type: ignore[index]
    assert [people.decode_payload(c.payload)["email"] for c in changes] == ["secret@example.org", "second@example.org"]  # type: ignore[arg-type]
    store.close()


def test_blind_index_finds_exactly_the_matching_rows(tmp_path: Path) -> None:
    with ls.open(tmp_path / "s.db", key=KEY) as store:
        people = _people(store)
        emails = [f"user{i % 40}@example.org" for i in range(400)] + ["User1@example.org", "user1@example.org "]
        people.put_many([{"id": f"r{i}", "owner": f"o{i % 7}", "email": e} for i, e in enumerate(emails)])
        people.put({"id": "none", "owner": "o", "email": None})
        for probe in ("user1@example.org", "user39@example.org", "User1@example.org"):
            expected = sorted(f"r{i}" for i, e in enumerate(emails) if e == probe)
            assert sorted(r["id"] for r in people.find(where={"email": probe})) == expected
            assert people.count({"email": probe}) == len(expected)
            assert sorted(people.keys({"email": {"=": probe}})) == expected
        both = people.find(where={"email": {"in": ["user2@example.org", "user3@example.org"]}, "owner": "o3"})
        assert sorted(r["id"] for r in both) == sorted(
            f"r{i}" for i, e in enumerate(emails) if e in ("user2@example.org", "user3@example.org") and i % 7 == 3
        )
        assert people.find(where={"email": "nobody@example.org"}) == []
        assert [r["id"] for r in people.find(where={"email": None})] == ["none"]
        with pytest.raises(ls.QueryError, match="blind_index"):
            people.find(where={"phone": "1"})
        with pytest.raises(ls.QueryError, match="encrypted"):
            people.find(order_by="email")
        with pytest.raises(ls.QueryError, match="= or 'in'"):
            people.find(where={"email": {">": "a"}})
        with pytest.raises(ls.QueryError):
            people.find(where={"email": 5})


def test_blind_index_is_keyed_per_store_and_field(tmp_path: Path) -> None:
    tags = []
    for name in ("a", "b"):
        with ls.open(tmp_path / f"{name}.db", key=KEY) as store:
            store.collection("c", key="id", fields={
                "id": ls.Text(), "x": ls.Text(encrypt=True, blind_index=True), "y": ls.Text(encrypt=True, blind_index=True),
            }).put({"id": "k", "x": "same", "y": "same"})
        x, y = _raw(tmp_path / f"{name}.db", "c", "x", "k"), _raw(tmp_path / f"{name}.db", "c", "y", "k")
        tags += [x[1 : 1 + crypto.TAG_BYTES], y[1 : 1 + crypto.TAG_BYTES]]
    assert len(set(tags)) == 4


def test_rolled_back_first_encrypted_write_leaves_usable_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        people = _people(store)
        with pytest.raises(RuntimeError), store.transaction():
            people.put({"id": "a", "owner": "o1", "email": "a@x", "notes": "n"})
            raise RuntimeError("roll back the keys made for this write")
        with store.transaction():
            with pytest.raises(RuntimeError), store.transaction():
                people.put({"id": "b", "owner": "o2", "email": "b@x", "notes": "n"})
                raise RuntimeError("savepoint rollback")
            people.put({"id": "c", "owner": "o2", "email": "c@x", "notes": "m"})
        people.put({"id": "d", "owner": "o1", "email": "d@x", "notes": "k"})
    with ls.open(path, key=KEY) as store:
        people = store.collection("people")
        assert [r["notes"] for r in people.find()] == ["m", "k"]
        assert [r["id"] for r in people.find(where={"email": "c@x"})] == ["c"]


def test_values_decode_in_a_fresh_process(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _people(store).put({"id": "k", "owner": "o", "email": "e@x", "phone": "42", "notes": "hello " * 50})
    script = (
        "import localstore as ls, sys\n"
        "row = ls.open(sys.argv[1]).collection('people').get('k')\n"
        "print(row['phone'], row['notes'].count('hello'), row['email'])\n"
    )
    env = {**subprocess_env, "LOCALSTORE_KEY": KEY}
    out = subprocess.run([PYTHON, "-c", script, str(path)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["42", "50", "e@x"]


def test_no_key_material_in_error_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _people(store).put({"id": "k", "owner": "o", "email": "e@x"})
    messages = []
    for bad in (ls.generate_key(), "not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises((ls.WrongKeyError, ls.KeyFileError)) as info:
            ls.open(path, key=bad)
        messages.append(str(info.value))
        assert bad not in str(info.value)
    assert all(KEY not in m for m in messages)


def test_every_value_gets_a_fresh_nonce(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "x": ls.Text(encrypt=True)})
        coll.put_many([{"id": i, "x": "same"} for i in range(250)])  # the first batch makes the data key
        coll.put_many([{"id": i, "x": "same"} for i in range(250, 500)])  # later batches take the fused path
        assert {r["x"] for r in coll.find()} == {"same"}
    conn = apsw.Connection(str(path))
    stored = [r[0] for r in conn.execute("SELECT x FROM c")]
    conn.close()
    nonces = {v[5:17] for v in stored}
    assert len(nonces) == 500 and len(set(stored)) == 500
    assert all(v[0] == crypto.FORMAT_ENCRYPTED and len(v) == len("same") + crypto.OVERHEAD for v in stored)
