"""The learning-profiles kit: blind-index lookup, erasure everywhere, export, TTL expiry, knowledge keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import localstore as ls
from localstore.kits.profiles import EXPORT_FORMAT, LearningProfiles, ProfileForgottenError

CANARY = "canary-7f3a9c-ada-lovelace"
USER = "ada.user@example.org"


@pytest.fixture
def key() -> str:
    return ls.generate_key()


@pytest.fixture
def kit(tmp_path: Path, key: str) -> Iterator[LearningProfiles]:
    store = ls.open(tmp_path / "tutor.db", key=key)
    try:
        yield LearningProfiles(store)
    finally:
        store.close()


def _ada(kit: LearningProfiles, **extra: object) -> str:
    pid = kit.create_profile(
        "ada", user_id=USER, learning_style=f"visual {CANARY}", preferred_difficulty="hard",
        knowledge_domains=["math", CANARY], learning_goals=[{"goal": CANARY}], privacy_settings={"share": False},
        sensitive_data={"diagnosis": CANARY}, **extra,  # type: ignore[arg-type]
    )
    kit.record_session(pid, session_id="s1", started_at=10.0, ended_at=20.0, domain="math", topics=["algebra"],
                       activities=[{"q": 1, "answer": CANARY}], performance={"score": 3}, notes=f"notes {CANARY}")
    kit.update_knowledge(pid, "math", "algebra", mastery=0.4, confidence=0.5, now=30.0)
    kit.update_knowledge(pid, "math", f"topic {CANARY}", mastery=0.9, confidence=0.2, now=31.0)
    return pid


def _raw_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_user_id_is_never_stored_in_the_clear_yet_found(kit: LearningProfiles, tmp_path: Path) -> None:
    pid = _ada(kit)
    kit.create_profile("bo", user_id="bo@example.org")
    found = kit.find_by_user(USER)
    assert found is not None and found["profile_id"] == pid and found["user_id"] == USER
    assert "key_salt" not in found
    assert kit.find_by_user("nobody@example.org") is None
    assert kit.profiles.fields["user_id"].blind_index and kit.profiles.fields["user_id"].encrypt
    kit.store.backup(tmp_path / "backup.db")
    raw = _raw_bytes(tmp_path)
    assert USER.encode() not in raw and CANARY.encode() not in raw
    with pytest.raises(ls.ValidationError, match="already has a profile"):
        kit.create_profile(user_id=USER)


def test_knowledge_states_are_unique_per_profile_domain_and_topic(kit: LearningProfiles) -> None:
    pid = _ada(kit)
    kit.update_knowledge(pid, "math", "algebra", mastery=0.6, confidence=0.7, attempts=2)
    states = kit.knowledge(pid)
    assert len(states) == 2
    algebra = [s for s in states if s["topic"] == "algebra"]
    assert len(algebra) == 1 and algebra[0]["mastery"] == 0.6 and algebra[0]["attempts"] == 3
    assert kit.knowledge(pid, "physics") == []
    sid = algebra[0]["state_id"]
    assert sid.startswith(f"{pid}:") and "algebra" not in sid and "math" not in sid
    assert kit.state_id(pid, "math", "algebra") == sid
    assert kit.state_id(pid, "math", "geometry") != sid
    other = kit.create_profile("cy", user_id="cy@example.org")
    assert kit.state_id(other, "math", "algebra").split(":")[1] != sid.split(":")[1]  # salted per profile
    with pytest.raises(ls.ValidationError, match=r"\[0, 1\]"):
        kit.update_knowledge(pid, "math", "algebra", mastery=1.5, confidence=0.5)


def test_forget_shreds_store_backup_and_change_log(kit: LearningProfiles, tmp_path: Path, key: str) -> None:
    pid = _ada(kit)
    kit.create_profile("bo", user_id="bo@example.org", learning_style="auditory")
    backup = kit.store.backup(tmp_path / "before-forget.db")
    with ls.open(backup, key=key, keys_from=kit.store) as copy:  # readable before forget: the check can fail
        assert copy.collection("learning_profiles").get(pid)["sensitive_data"] == {"diagnosis": CANARY}  # type: ignore[index]

    assert kit.forget(pid) is True
    assert kit.is_forgotten(pid) and not kit.is_forgotten("bo")

    profile = kit.get_profile(pid)
    assert profile is not None
    for name in ("user_id", "learning_style", "knowledge_domains", "learning_goals", "sensitive_data", "privacy_settings"):
        assert profile[name] is ls.FORGOTTEN, name
    session = kit.sessions_of(pid)[0]
    assert session["notes"] is ls.FORGOTTEN and session["activities"] is ls.FORGOTTEN
    assert session["started_at"] == 10.0  # structure stays
    assert all(s["topic"] is ls.FORGOTTEN for s in kit.knowledge(pid))
    assert kit.find_by_user(USER) is None
    assert kit.get_profile("bo")["learning_style"] == "auditory"  # type: ignore[index]

    with ls.open(backup, key=key, keys_from=kit.store) as copy:
        old = copy.collection("learning_profiles").get(pid)
        assert old is not None and old["sensitive_data"] is ls.FORGOTTEN and old["user_id"] is ls.FORGOTTEN
    with ls.open(backup, key=key) as copy, pytest.raises(ls.MissingKeyError):
        copy.collection("learning_profiles").get(pid)

    decoded = []
    for change in kit.store.changelog.changes(limit=100_000):
        if change.payload and change.collection in ("learning_profiles", "learning_sessions", "knowledge_states"):
            row = kit.store.collection(change.collection).decode_payload(change.payload)
            if row.get("profile_id") == pid:
                decoded.append(row)
    assert len(decoded) == 4  # the profile, its session and its two knowledge states
    secret = {"user_id", "learning_style", "sensitive_data", "notes", "activities", "topic", "domain"}
    assert all(v is ls.FORGOTTEN for row in decoded for k, v in row.items() if k in secret and v is not None)
    assert CANARY.encode() not in _raw_bytes(tmp_path)

    with pytest.raises(ProfileForgottenError):
        kit.update_knowledge(pid, "math", "algebra", mastery=0.1, confidence=0.1)
    with pytest.raises(ProfileForgottenError):
        kit.record_session(pid)
    with pytest.raises(ProfileForgottenError):
        kit.update_profile(pid, learning_style="kinesthetic")


def test_forget_with_delete_removes_rows_and_logs_deletes(kit: LearningProfiles) -> None:
    pid = _ada(kit)
    kit.forget(pid, delete=True)
    assert kit.get_profile(pid) is None and kit.sessions_of(pid) == [] and kit.states.count({"profile_id": pid}) == 0
    deletes = [c for c in kit.store.changelog.changes(limit=10_000) if c.op == "delete"]
    assert {c.collection for c in deletes} == {"learning_profiles", "learning_sessions", "knowledge_states"}
    assert kit.forget(pid) is False  # nothing left to shred


def test_export_round_trip(kit: LearningProfiles, tmp_path: Path) -> None:
    pid = _ada(kit, ttl_expires_at=5_000_000_000.0)
    kit.record_session(pid, session_id="s2", started_at=40.0, domain="music")
    text = kit.export_json(pid, tmp_path / "export.json")
    assert (tmp_path / "export.json").stat().st_mode & 0o077 == 0
    doc = json.loads(text)
    assert doc["format"] == EXPORT_FORMAT and doc["forgotten"] is False
    assert doc["profile"]["user_id"] == USER and doc["profile"]["sensitive_data"] == {"diagnosis": CANARY}
    assert "key_salt" not in doc["profile"] and doc["profile"]["_forgotten"] == []
    assert [s["session_id"] for s in doc["sessions"]] == ["s1", "s2"]
    assert len(doc["knowledge_states"]) == 2 and "state_id" not in doc["knowledge_states"][0]

    with ls.open(tmp_path / "elsewhere.db", key=ls.generate_key()) as other_store:
        other = LearningProfiles(other_store)
        assert other.import_profile(text) == pid
        again = other.export(pid)
    for part in ("profile", "sessions", "knowledge_states"):
        assert again[part] == doc[part], part
    with pytest.raises(ls.ValidationError, match="exists"):
        kit.import_profile(doc)


def test_export_of_a_forgotten_profile_marks_nulls(kit: LearningProfiles) -> None:
    pid = _ada(kit)
    kit.forget(pid)
    doc = kit.export(pid)
    assert doc["forgotten"] is True
    assert doc["profile"]["user_id"] is None and "user_id" in doc["profile"]["_forgotten"]
    assert "preferred_difficulty" in doc["profile"]["_forgotten"]
    assert doc["sessions"][0]["notes"] is None and "notes" in doc["sessions"][0]["_forgotten"]
    assert all("topic" in s["_forgotten"] for s in doc["knowledge_states"])
    assert CANARY not in json.dumps(doc)
    with pytest.raises(ProfileForgottenError):
        kit.import_profile(doc)
    with pytest.raises(ls.ValidationError):
        kit.export("nobody")


def test_expire_profiles_forgets_and_deletes(kit: LearningProfiles, tmp_path: Path, key: str) -> None:
    old = _ada(kit, ttl_expires_at=1_000.0)
    kit.create_profile("fresh", user_id="fresh@example.org", ttl_seconds=3600, now=1_000.0)
    kit.create_profile("forever", user_id="forever@example.org")
    backup = kit.store.backup(tmp_path / "b.db")
    assert kit.expire_profiles(now=999.0) == []
    assert kit.expire_profiles(now=2_000.0) == [old]
    assert kit.get_profile(old) is None and kit.sessions_of(old) == [] and kit.knowledge(old) == []
    assert kit.get_profile("fresh") is not None and kit.get_profile("forever") is not None
    with ls.open(backup, key=key, keys_from=kit.store) as copy:
        assert copy.collection("learning_profiles").get(old)["sensitive_data"] is ls.FORGOTTEN  # type: ignore[index]
    assert kit.expire_profiles(now=1_000.0 + 3600) == ["fresh"]
    assert kit.expire_profiles(now=10**12) == []
    assert kit.create_profile(old, user_id=USER) == old  # the id may be used again, under a new key


def test_update_profile(kit: LearningProfiles) -> None:
    pid = kit.create_profile(user_id="x@example.org", learning_goals=["a"])
    assert len(pid) == 32
    updated = kit.update_profile(pid, learning_goals=["a", "b"], preferred_difficulty="easy")
    assert kit.get_profile(pid) == updated and updated["learning_goals"] == ["a", "b"]
    with pytest.raises(ls.ValidationError, match="cannot set"):
        kit.update_profile(pid, key_salt=b"x")
    with pytest.raises(ls.ValidationError):
        kit.update_profile("missing", learning_style="x")


def test_forget_reaches_the_central_copy_as_ciphertext_only(tmp_path: Path, key: str, pg_url: str, pg_schema: str) -> None:
    """Sync ships personal values as ciphertext only; subject keys never leave the store, so forget covers Postgres."""
    import psycopg
    from localstore.sync import SyncEngine
    from psycopg import sql

    ws = ls.Workspace(tmp_path / "ws")
    store = ws.open("tutor", key=key)
    kit = LearningProfiles(store)
    pid = _ada(kit)
    engine = SyncEngine(ws, pg_url, schema=pg_schema, watch=False)
    try:
        engine.sync_now()
        kit.forget(pid)
        later = kit.create_profile(user_id="later@example.org")
        kit.record_session(later, started_at=1.0)  # later writes still ship
        kit.update_knowledge(later, "art", "color", mastery=0.1, confidence=0.1)
        engine.sync_now()
    finally:
        engine.close()
    with psycopg.connect(pg_url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg_schema,))]

        def count(table: str) -> int:
            query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(pg_schema), sql.Identifier(table))
            return int(conn.execute(query).fetchone()[0])  # type: ignore[index]

        # the rows did reach Postgres, so the scan below can fail
        assert count("c_learning_profiles") == 2 and count("c_knowledge_states") == 3 and count("c_learning_sessions") == 2
        dump = ""
        for table in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} t").format(sql.Identifier(pg_schema), sql.Identifier(table))
            dump += "\n".join(r[0] for r in conn.execute(query))
    for secret in (CANARY, USER):
        assert secret not in dump and secret.encode().hex() not in dump
    ws.close()

