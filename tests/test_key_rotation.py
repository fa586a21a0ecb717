"""Key-rotation regressions the model-based sync test found (``tests/test_model_sync.py``), one test each."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from _people import COLL, declare

import localstore as ls


def test_handle_left_on_the_old_master_key_cannot_wrap_new_keys(tmp_path: Path, master_key: str) -> None:
    """Regression (found by the model): a second handle opened before ``rotate_key`` wrapped new keys under the old key.

    Handle B, opened with the old master key, wrote a value for a new subject after
    handle A rotated the key: B made the subject's key, wrapped it under the old
    master key and committed, so the value was unreadable with the new key (and the
    store no longer opened with the old one). Now B's write is refused with
    ``WrongKeyError`` and nothing is written; B's reads say to reopen with the new key.
    """
    path = tmp_path / "s.db"
    new_key = ls.generate_key()
    with ls.open(path, key=master_key) as a:
        declare(a).put({"pid": "a", "subj": "ada", "name": None, "n": 1, "secret": "s", "email": "e"})
        b = ls.open(path, key=master_key)  # opened once the keys exist: it unwrapped the root key at open
        rotated = a.rotate_key(new_key)
        assert rotated == 3  # root, data and ada's key
        stale = b.collection(COLL)
        for row in ({"pid": "b", "subj": "bob", "name": None, "n": 2, "secret": None, "email": "new subject"},
                    {"pid": "c", "subj": "ada", "name": None, "n": 3, "secret": "data key", "email": None}):
            with pytest.raises(ls.WrongKeyError, match="reopen the store with the new key"):
                stale.put(row)
        stale.put({"pid": "d", "subj": "cy", "name": "plain only", "n": 4, "secret": None, "email": None})
        b.close()
    with ls.open(path, key=new_key) as store:
        coll = store.collection(COLL)
        assert coll.get("b") is None and coll.get("c") is None
        assert coll.get("a") == {"pid": "a", "subj": "ada", "name": None, "n": 1, "secret": "s", "email": "e"}
        assert coll.get("d") is not None
        assert store.verify().ok


def test_rotating_a_store_with_no_key_yet_binds_it_to_the_new_key(tmp_path: Path, master_key: str) -> None:
    """Regression: ``rotate_key`` on a store with no encrypted value yet left the old master key working.

    It re-wrapped nothing and returned 0, so the old key still opened the store, and the
    first encrypted value written through it bound the store to the old key: the new
    one was then refused. Now the rotation makes the root key under the new master key.
    """
    path = tmp_path / "s.db"
    new_key = ls.generate_key()
    with ls.open(path, key=master_key) as store:
        declare(store).put({"pid": "a", "subj": "ada", "name": "plain", "n": 1, "secret": None, "email": None})
        rewrapped = store.rotate_key(new_key)
        assert rewrapped == 0
    with pytest.raises(ls.WrongKeyError):
        ls.open(path, key=master_key)  # it opened, and a write through it bound the store to the old key
    with ls.open(path, key=new_key) as store:
        store.collection(COLL).put({"pid": "b", "subj": "ada", "name": None, "n": 2, "secret": "s", "email": "e"})
    with ls.open(path, key=new_key) as store:
        assert store.collection(COLL).get("b") == {"pid": "b", "subj": "ada", "name": None, "n": 2,
                                                    "secret": "s", "email": "e"}
        assert store.verify().ok


def test_a_failed_rotation_of_a_store_with_no_key_yet_keeps_the_old_key(tmp_path: Path, master_key: str) -> None:
    """Regression: a rotation that did not commit left the handle on the new master key (the store on none).

    The handle's next encrypted write then made the root key under the new key, binding the
    store to a key whose rotation had failed. Now the new key is used only after the commit.
    """
    path = tmp_path / "s.db"
    with ls.open(path, key=master_key) as store:
        declare(store)
        keys = store._keys
        with pytest.raises(RuntimeError), store.transaction():
            keys.rewrap(base64.b64decode(ls.generate_key()))  # what rotate_key runs, then a failure before commit
            raise RuntimeError("the commit never happens")
        store.collection(COLL).put({"pid": "a", "subj": "ada", "name": None, "n": 1, "secret": "s", "email": None})
    with ls.open(path, key=master_key) as store:
        assert store.collection(COLL).get("a")["secret"] == "s"  # type: ignore[index]


@pytest.mark.parametrize("then_reencrypt", [False, True])
def test_handle_that_made_the_keys_is_stale_after_a_rotation_elsewhere(
    tmp_path: Path, master_key: str, then_reencrypt: bool
) -> None:
    """Regression (found by the model): the handle that created the root key kept it cached past a rotation.

    So it still wrapped new keys under the old master key (a new subject's key), and
    after ``reencrypt`` elsewhere its write failed with a bare ``LookupError``. Now both
    writes are refused with ``WrongKeyError``, and nothing unreadable is written.
    """
    path = tmp_path / "s.db"
    new_key = ls.generate_key()
    with ls.open(path, key=master_key) as b:
        declare(b).put({"pid": "a", "subj": "ada", "name": None, "n": 1, "secret": "", "email": None})  # b makes the keys
        with ls.open(path, key=master_key) as a:
            rewrapped = a.rotate_key(new_key)
            assert rewrapped == 2
            if then_reencrypt:
                a.reencrypt()
        stale = b.collection(COLL)
        with pytest.raises(ls.WrongKeyError, match="reopen the store with the new key"):
            stale.put({"pid": "b", "subj": "bob", "name": None, "n": 2, "secret": None, "email": "new subject"})
        with pytest.raises(ls.WrongKeyError, match="reopen the store with the new key"):
            stale.put({"pid": "c", "subj": "ada", "name": None, "n": 3, "secret": "data key", "email": None})
    with ls.open(path, key=new_key) as store:
        coll = store.collection(COLL)
        assert coll.get("b") is None and coll.get("c") is None
        assert coll.get("a") == {"pid": "a", "subj": "ada", "name": None, "n": 1, "secret": "", "email": None}
        assert store.verify().ok
