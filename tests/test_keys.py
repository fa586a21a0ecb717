"""Keys: master key sources and key files, message caps, rotation, re-encryption, and forget."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import apsw
import pytest
from conftest import PYTHON

import localstore as ls
from localstore import crypto

KEY = ls.generate_key()


def _notes(store: ls.Store) -> ls.Collection:
    return store.collection("notes", key="id", fields={
        "id": ls.Text(),
        "profile_id": ls.Text(),
        "email": ls.Text(encrypt=True, blind_index=True, subject="profile_id"),
        "body": ls.Text(encrypt=True, compress=True, subject="profile_id"),
        "title": ls.Text(encrypt=True),
        "plain": ls.Text(),
    })


def _rows(n: int, profiles: int = 3) -> list[dict[str, Any]]:
    return [
        {"id": f"n{i}", "profile_id": f"p{i % profiles}", "email": f"p{i % profiles}@example.org",
         "body": f"private note {i} of p{i % profiles} " * 5, "title": f"title {i}", "plain": f"plain {i}"}
        for i in range(n)
    ]


def _key_rows(path: Path) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(path))
    try:
        return conn.execute("SELECT id, kind, state, wrapped, messages FROM _ls_keys ORDER BY id").fetchall()
    finally:
        conn.close()


# -- where the master key comes from ---------------------------------------------------------


def test_key_file_0600_is_used_and_looser_modes_are_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    ls.write_key_file(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    path = tmp_path / "s.db"
    with ls.open(path, key_file=key_file) as store:
        _notes(store).put(_rows(1)[0])
    for mode in (0o644, 0o640, 0o604, 0o660, 0o666):
        os.chmod(key_file, mode)
        with pytest.raises(ls.KeyFileError) as info:
            ls.open(path, key_file=key_file)
        assert f"{mode:04o}" in str(info.value) and "chmod 600" in str(info.value)
        assert key_file.read_text().strip() not in str(info.value)
    os.chmod(key_file, 0o400)
    with ls.open(path, key_file=key_file) as store:
        assert store.collection("notes").get("n0")["title"] == "title 0"  # type: ignore[index]
    with pytest.raises(ls.KeyFileError, match="already exists"):
        ls.write_key_file(key_file)


def test_key_from_environment_and_key_file_environment(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _notes(store).put(_rows(1)[0])
    key_file = ls.write_key_file(tmp_path / "k", KEY)
    script = "import localstore as ls, sys; print(ls.open(sys.argv[1]).collection('notes').get('n0')['title'])"
    for extra in ({"LOCALSTORE_KEY": KEY}, {"LOCALSTORE_KEY_FILE": key_file}):
        env = {**subprocess_env, **extra}
        env.pop("LOCALSTORE_KEY" if "LOCALSTORE_KEY_FILE" in extra else "LOCALSTORE_KEY_FILE", None)
        out = subprocess.run([PYTHON, "-c", script, str(path)], check=False, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "title 0"
    os.chmod(key_file, 0o644)
    env = {**subprocess_env, "LOCALSTORE_KEY_FILE": key_file}
    env.pop("LOCALSTORE_KEY", None)
    out = subprocess.run([PYTHON, "-c", script, str(path)], check=False, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "KeyFileError" in out.stderr and "chmod 600" in out.stderr


def test_malformed_keys_are_refused_without_echoing_them(tmp_path: Path) -> None:
    for bad in ("short", "not*base64*at*all", "QUJD", b"\x01" * 31):
        with pytest.raises(ls.KeyFileError) as info:
            ls.open(tmp_path / "s.db", key=bad)
        assert not isinstance(bad, str) or bad not in str(info.value)
    assert not (tmp_path / "s.db").exists()  # refused before the store was created


# -- data keys: message cap, rotation, re-encryption ---------------------------------------------


def test_data_key_rotates_at_the_message_cap(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY, max_messages_per_key=5000) as store:
        coll = store.collection("c", key="id", fields={"id": ls.Integer(), "x": ls.Text(encrypt=True)})
        for start in range(0, 30_000, 3_000):
            coll.put_many([{"id": i, "x": f"v{i}"} for i in range(start, start + 3_000)])
        assert [r["x"] for r in coll.find(where=None)][::7_000] == [f"v{i}" for i in range(0, 30_000, 7_000)]
    data_keys = [r for r in _key_rows(path) if r[1] == "data"]
    assert len(data_keys) >= 6
    assert all(r[4] <= 5000 for r in data_keys)
    conn = apsw.Connection(str(path))
    used = {crypto.key_id_of(r[0]) for r in conn.execute("SELECT x FROM c")}
    conn.close()
    assert used == {r[0] for r in data_keys}


def test_rotate_key_with_data_then_reencrypt(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = _rows(60)
    with ls.open(path, key=KEY) as store:
        notes = _notes(store)
        notes.put_many(rows[:30])
        new = ls.generate_key()
        assert store.rotate_key(new) >= 2
        notes.put_many(rows[30:])  # writes continue, under the re-wrapped keys
        assert notes.find() == rows
        before = store.changelog.last_seq()
    with pytest.raises(ls.WrongKeyError):
        ls.open(path, key=KEY)
    with ls.open(path, key=new) as store:
        notes = store.collection("notes")
        assert notes.find() == rows
        old_data = {r[0] for r in _key_rows(path) if r[1] == "data"}
        assert store.reencrypt() == 60
        newest = max(r[0] for r in _key_rows(path) if r[1] == "data")
        assert newest not in old_data
        assert notes.find() == rows
        assert store.changelog.last_seq() == before + 60  # the new ciphertexts are logged, so they sync
        for change in store.changelog.changes(after=before, limit=100):
            assert notes.decode_payload(change.payload) in rows  # type: ignore[arg-type]
        assert store.verify().ok
    conn = apsw.Connection(str(path))
    title_keys = {crypto.key_id_of(r[0]) for r in conn.execute("SELECT title FROM notes")}
    conn.close()
    assert len(title_keys) == 1


def test_rotation_needs_the_current_key(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _notes(store).put(_rows(1)[0])
    with ls.open(path) as store, pytest.raises(ls.MissingKeyError):
        store.rotate_key(ls.generate_key())
    with ls.open(path, key=KEY) as store:
        with pytest.raises(ls.KeyFileError):
            store.rotate_key("nope")
        assert store.collection("notes").get("n0")["title"] == "title 0"  # type: ignore[index]


# -- forget ----------------------------------------------------------------------------------------


def test_forget_in_store_backup_and_change_log(tmp_path: Path) -> None:
    path, backup = tmp_path / "s.db", tmp_path / "backup.db"
    rows = _rows(30)
    with ls.open(path, key=KEY) as store:
        notes = _notes(store)
        notes.put_many(rows)
        notes.put_many(rows[:6])  # an overwrite, so old versions sit in the change log as payloads
        store.backup(backup)
        with ls.open(backup, key=KEY, keys_from=store) as copy:  # before forget: the backup reads everything
            assert copy.collection("notes").find() == rows
        wrapped_before = [r[3] for r in _key_rows(path) if r[1] == "subject"]
        assert store.forget("p1") is True
        assert store.forget("p1") is False  # already gone
        assert store.forget("nobody") is False

        def check(coll: ls.Collection, found: list[dict[str, Any]]) -> None:
            by_id = {r["id"]: r for r in found}
            assert len(by_id) == 30
            for row in rows:
                got = by_id[row["id"]]
                if row["profile_id"] == "p1":
                    assert got["email"] is ls.FORGOTTEN and got["body"] is ls.FORGOTTEN
                    assert got["title"] == row["title"] and got["plain"] == row["plain"]  # not the subject's key
                else:
                    assert got == row

        check(notes, notes.find())
        assert notes.find(where={"email": "p1@example.org"}) == []
        assert len(notes.find(where={"email": "p2@example.org"})) == 10
        logged = [notes.decode_payload(c.payload) for c in store.changelog.changes(limit=1000) if c.payload]
        assert len(logged) == 36
        for row in logged:
            if row["profile_id"] == "p1":
                assert row["email"] is ls.FORGOTTEN and row["body"] is ls.FORGOTTEN
            else:
                assert row in rows
        # the key's bytes are gone from the file and its WAL
        blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.db"))
        remaining = [w for w in wrapped_before if w in blob]
        assert len(remaining) == len(wrapped_before) - 1
        with ls.open(backup, key=KEY, keys_from=store) as copy:  # a backup taken earlier
            check(copy.collection("notes"), copy.collection("notes").find())
            assert copy.collection("notes").find(where={"email": "p1@example.org"}) == []
        # without the live store, no subject key at all
        with ls.open(backup, key=KEY) as copy, pytest.raises(ls.MissingKeyError, match="keys_from"):
            copy.collection("notes").get("n0")
        # a new write for the forgotten subject gets a new key
        notes.put({**rows[1], "id": "again"})
        assert notes.get("again") == {**rows[1], "id": "again"}
        assert notes.get(rows[1]["id"])["body"] is ls.FORGOTTEN  # type: ignore[index]
    with ls.open(path, key=KEY) as store:
        assert store.collection("notes").get("n1")["email"] is ls.FORGOTTEN  # type: ignore[index]
    backup_blob = backup.read_bytes()
    assert not any(w in backup_blob for w in wrapped_before)  # backups never carry subject keys


def test_forget_seen_by_another_open_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as one, ls.open(path, key=KEY) as two:
        _notes(one).put_many(_rows(6))
        other = two.collection("notes")
        assert other.get("n1")["body"].startswith("private")  # type: ignore[index]  (key now cached in `two`)
        assert len(other.find(where={"email": "p1@example.org"})) == 2
        logged = two.changelog.changes()
        assert other.decode_payload(logged[1].payload)["body"].startswith("private")  # type: ignore[arg-type]
        one.forget("p1")
        assert other.decode_payload(logged[1].payload)["body"] is ls.FORGOTTEN  # type: ignore[arg-type]
        assert other.get("n1")["body"] is ls.FORGOTTEN  # type: ignore[index]
        assert other.find(where={"email": "p1@example.org"}) == []
        other.put({**_rows(6)[1], "id": "fresh"})  # `two` must not write with the destroyed key
    with ls.open(path, key=KEY) as store:
        assert store.collection("notes").get("fresh")["email"] == "p1@example.org"  # type: ignore[index]


def test_forgotten_sentinel(tmp_path: Path) -> None:
    import pickle

    assert not ls.FORGOTTEN and repr(ls.FORGOTTEN) == "localstore.FORGOTTEN"
    assert ls.Forgotten() is ls.FORGOTTEN and pickle.loads(pickle.dumps(ls.FORGOTTEN)) is ls.FORGOTTEN
    assert ls.FORGOTTEN != "" and ls.FORGOTTEN != None


def test_two_connections_writing_encrypted_rows_share_keys_safely(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    one, two = ls.open(path, key=KEY, max_messages_per_key=4096), ls.open(path, key=KEY, max_messages_per_key=4096)
    try:
        a, b = _notes(one), _notes(two)
        for round_no in range(6):
            a.put_many([{**r, "id": f"a{round_no}-{r['id']}"} for r in _rows(900)])
            b.put_many([{**r, "id": f"b{round_no}-{r['id']}"} for r in _rows(900)])
    finally:
        one.close()
        two.close()
    with ls.open(path, key=KEY) as store:
        found = store.collection("notes").find()
        assert len(found) == 2 * 6 * 900
        assert {r["title"] for r in found} == {f"title {i}" for i in range(900)}
    rows = _key_rows(path)
    assert sum(r[4] for r in rows if r[1] == "data") >= 2 * 6 * 900  # reserved blocks cover every value
    assert len([r for r in rows if r[1] == "subject"]) == 3  # one key per subject, whoever wrote first


def test_key_management_refuses_to_run_inside_a_transaction(tmp_path: Path) -> None:
    with ls.open(tmp_path / "s.db", key=KEY) as store:
        notes = _notes(store)
        notes.put(_rows(1)[0])
        for call in (lambda: store.forget("p0"), lambda: store.rotate_key(ls.generate_key()), store.reencrypt):
            with store.transaction(), pytest.raises(ls.LocalStoreError, match="inside a transaction"):
                call()
        assert notes.get("n0") == _rows(1)[0]


def test_integer_subjects_and_integer_blind_index(tmp_path: Path) -> None:
    with ls.open(tmp_path / "s.db", key=KEY) as store:
        coll = store.collection("scores", key="id", fields={
            "id": ls.Text(), "user": ls.Integer(),
            "score": ls.Integer(encrypt=True, blind_index=True, subject="user"),
            "ratio": ls.Real(encrypt=True, subject="user"),
        })
        coll.put_many([{"id": f"r{i}", "user": i % 4, "score": i % 5, "ratio": i / 7} for i in range(40)])
        assert sorted(r["id"] for r in coll.find(where={"score": 3})) == sorted(f"r{i}" for i in range(40) if i % 5 == 3)
        assert store.forget("2") is False  # subjects are typed: the Integer 2 is not the text "2"
        assert store.forget(2) is True
        rows = {r["id"]: r for r in coll.find()}
        assert all((rows[f"r{i}"]["score"] is ls.FORGOTTEN) == (i % 4 == 2) for i in range(40))
        assert sorted(r["id"] for r in coll.find(where={"score": 3})) == sorted(
            f"r{i}" for i in range(40) if i % 5 == 3 and i % 4 != 2
        )
        with pytest.raises(ls.ValidationError, match="subject id"):
            store.forget(None)  # type: ignore[arg-type]
        with pytest.raises(ls.ValidationError, match="'user'"):
            coll.put({"id": "x", "score": 1})


def test_keys_from_must_be_the_same_store(tmp_path: Path) -> None:
    with ls.open(tmp_path / "a.db", key=KEY) as a, ls.open(tmp_path / "b.db", key=KEY) as b:
        _notes(a).put(_rows(1)[0])
        a.backup(tmp_path / "a-copy.db")
        with pytest.raises(ls.StoreOpenError, match="copy of store"):
            ls.open(tmp_path / "a-copy.db", key=KEY, keys_from=b)
        import apsw

        b_path = os.path.realpath(tmp_path / "b.db")
        before = sum(c.filename == b_path for c in apsw.connections())
        with pytest.raises(ls.StoreOpenError, match="copy of store"):
            ls.open(tmp_path / "a-copy.db", key=KEY, keys_from=tmp_path / "b.db")
        assert sum(c.filename == b_path for c in apsw.connections()) == before  # the one it opened is closed
        with ls.open(tmp_path / "a-copy.db", key=KEY, keys_from=tmp_path / "a.db") as copy:
            assert copy.collection("notes").get("n0") == _rows(1)[0]


def test_a_hand_altered_key_table_is_a_missing_key_error_on_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, key=KEY) as store:
        _notes(store).put_many(_rows(5))
    conn = apsw.Connection(str(path))  # through cksumvfs (the process default now): pages stay valid
    for key_id, wrapped in conn.execute("SELECT id, wrapped FROM _ls_keys WHERE kind = 'data'").fetchall():
        conn.execute("UPDATE _ls_keys SET wrapped = ? WHERE id = ?", (bytes([wrapped[0] ^ 1]) + wrapped[1:], key_id))
    conn.close()
    with ls.open(path, key=KEY) as store:
        notes = _notes(store)
        with pytest.raises(ls.MissingKeyError, match="does not unwrap") as err:
            notes.put_many(_rows(8))  # reuses the altered data key: a localstore error, not a bare LookupError
        assert str(path) in str(err.value)
        with pytest.raises(ls.MissingKeyError):
            notes.get(_rows(1)[0]["id"])
        assert notes.count() == 5  # nothing written


def test_a_rolled_back_savepoint_takes_its_key_reservation_with_it(tmp_path: Path) -> None:
    """Encryptions after a savepoint that reserved message counts and rolled back are still counted in the file."""
    from localstore.keys import DEFAULT_RESERVE_BLOCK

    store = ls.open(tmp_path / "s.db", key=ls.generate_key())
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Text(encrypt=True)})
    coll.put({"k": "first", "v": "x"})  # the data key, and a first block of messages reserved and committed

    def counted() -> int:
        return int(store._db.execute("SELECT sum(messages) FROM _ls_keys WHERE kind = 'data'").fetchone()[0])

    before = counted()
    with store.transaction():
        with contextlib.suppress(RuntimeError), store.transaction():
            coll.put({"k": "a", "v": "secret"})  # reserves the next block: undone with the savepoint
            raise RuntimeError
        coll.put_many([{"k": f"r{i}", "v": "x"} for i in range(100)])
    assert counted() >= before + 100, "messages encrypted under a reservation the file no longer has"
    assert counted() <= before + 2 * DEFAULT_RESERVE_BLOCK
    assert [coll.get(f"r{i}")["v"] for i in (0, 99)] == ["x", "x"]
    store.close()
