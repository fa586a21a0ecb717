"""Learning profiles (privacy-critical): profiles, learning sessions and knowledge states.

Every personal value is encrypted under the key of its profile (``subject="profile_id"``),
so that ``forget(profile_id)`` crypto-shreds it everywhere a copy went: the rows, the change
log (and so whatever sync shipped), and backups taken earlier. What stays in the clear is
structure only: ids, timestamps, mastery/confidence numbers and ``ttl_expires_at``.

- ``learning_profiles``: profile_id (key); user_id (encrypted, with a blind index: the raw
  id is never stored in the clear, yet ``find_by_user`` finds it); learning_style,
  preferred_difficulty, knowledge_domains, learning_goals, privacy_settings, sensitive_data
  (all encrypted); created_at, updated_at, ttl_expires_at (epoch seconds, plain).
- ``learning_sessions``: session_id (key), profile_id, started_at, ended_at (plain); domain,
  topics, activities, performance, notes (encrypted).
- ``knowledge_states``: one row per (profile, domain, topic): mastery and confidence (plain
  numbers), domain and topic (encrypted), attempts, updated_at. The key is
  ``<profile_id>:<HMAC(profile salt, domain, topic)>``: unique per profile, domain and topic
  (the same on every replica, so sync converges), yet it reveals neither: the salt is a
  random value kept encrypted in the profile, and is shredded with it.

Erasure: ``forget(profile_id)`` keeps the rows, whose personal values then read as
``ls.FORGOTTEN`` (``export`` gives them as null, listed under ``"_forgotten"``); pass
``delete=True`` to delete the rows as well. TTL: ``expire_profiles()`` forgets *and*
deletes every profile whose ``ttl_expires_at`` has passed, with its sessions and states.

    store = ls.open("data/tutor.db", key_file="master.key")
    profiles = LearningProfiles(store)
    pid = profiles.create_profile(user_id="ada@example.org", learning_style="visual", ttl_seconds=86400 * 365)
    profiles.update_knowledge(pid, "math", "algebra", mastery=0.6, confidence=0.8)
    profiles.find_by_user("ada@example.org")["profile_id"] == pid
    data = profiles.export(pid)       # JSON-ready dict: the profile, its sessions and states
    profiles.forget(pid)              # crypto-shredded in the store, backups and change log
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import localstore as ls

#: The ``format`` tag of ``export`` documents.
EXPORT_FORMAT = "localstore.kits.profiles/1"

#: Bytes of the random per-profile salt that keys knowledge-state ids.
SALT_BYTES = 16

_SUBJECT = "profile_id"


def _secret(kind: type[ls.Field], **options: Any) -> ls.Field:
    """A field encrypted under the profile's own key (forgotten with it)."""
    return kind(encrypt=True, subject=_SUBJECT, **options)


PROFILE_FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "profile_id": ls.Text(),
    "user_id": _secret(ls.Text, blind_index=True),
    "learning_style": _secret(ls.Text),
    "preferred_difficulty": _secret(ls.Text),
    "knowledge_domains": _secret(ls.Json),
    "learning_goals": _secret(ls.Json),
    "privacy_settings": _secret(ls.Json),
    "sensitive_data": _secret(ls.Json, compress=True),
    "key_salt": _secret(ls.Blob),
    "created_at": ls.Real(),
    "updated_at": ls.Real(),
    "ttl_expires_at": ls.Real(index=True),
}

SESSION_FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "session_id": ls.Text(),
    "profile_id": ls.Text(index=True),
    "started_at": ls.Real(index=True),
    "ended_at": ls.Real(),
    "domain": _secret(ls.Text),
    "topics": _secret(ls.Json),
    "activities": _secret(ls.Json, compress=True),
    "performance": _secret(ls.Json),
    "notes": _secret(ls.Text, compress=True),
}

STATE_FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "state_id": ls.Text(),
    "profile_id": ls.Text(index=True),
    "domain": _secret(ls.Text),
    "topic": _secret(ls.Text),
    "mastery": ls.Real(),
    "confidence": ls.Real(),
    "attempts": ls.Integer(default=0),
    "updated_at": ls.Real(),
}

#: Profile fields a caller may set through create_profile/update_profile.
PROFILE_SETTABLE = ("user_id", "learning_style", "preferred_difficulty", "knowledge_domains", "learning_goals",
                    "privacy_settings", "sensitive_data", "ttl_expires_at")

_INTERNAL = {"key_salt", "state_id"}


class ProfileForgottenError(ls.LocalStoreError):
    """The profile was forgotten (crypto-shredded); its personal values cannot be read or written again."""


class LearningProfiles:
    """The learning-profiles kit over one store opened with a master key."""

    def __init__(self, store: ls.Store) -> None:
        self.store = store
        self.profiles = store.collection("learning_profiles", key="profile_id", fields=PROFILE_FIELDS)
        self.sessions = store.collection("learning_sessions", key="session_id", fields=SESSION_FIELDS)
        self.states = store.collection("knowledge_states", key="state_id", fields=STATE_FIELDS)

    # -- profiles -------------------------------------------------------------------------

    def create_profile(
        self,
        profile_id: str | None = None,
        *,
        user_id: str,
        learning_style: str | None = None,
        preferred_difficulty: str | None = None,
        knowledge_domains: Iterable[str] = (),
        learning_goals: Iterable[Any] = (),
        privacy_settings: dict[str, Any] | None = None,
        sensitive_data: dict[str, Any] | None = None,
        ttl_seconds: float | None = None,
        ttl_expires_at: float | None = None,
        now: float | None = None,
    ) -> str:
        """Create a profile for ``user_id`` (a fresh random id unless given); return its profile_id.

        One live profile per user id: a second one raises ``ValidationError``. The TTL is
        ``ttl_expires_at`` (epoch seconds) or ``now + ttl_seconds``; None means no expiry.
        """
        if not isinstance(user_id, str) or not user_id:
            raise ls.ValidationError("learning_profiles.user_id: expected a non-empty str")
        now = time.time() if now is None else now
        pid = profile_id or uuid.uuid4().hex
        if ttl_expires_at is None and ttl_seconds is not None:
            ttl_expires_at = now + ttl_seconds
        with self.store._all_or_nothing():
            existing = self.profiles.get(pid)
            if existing is not None:
                raise ls.ValidationError(f"learning_profiles: profile {pid!r} exists in {self.store.path}")
            if self.profiles.count({"user_id": user_id}):
                raise ls.ValidationError(f"learning_profiles: user already has a profile in {self.store.path}")
            self.profiles.put({
                "profile_id": pid, "user_id": user_id, "learning_style": learning_style,
                "preferred_difficulty": preferred_difficulty, "knowledge_domains": list(knowledge_domains),
                "learning_goals": list(learning_goals), "privacy_settings": privacy_settings or {},
                "sensitive_data": sensitive_data or {}, "key_salt": os.urandom(SALT_BYTES),
                "created_at": now, "updated_at": now, "ttl_expires_at": ttl_expires_at,
            })
        return pid

    def update_profile(self, profile_id: str, **changes: Any) -> dict[str, Any]:
        """Change some of a live profile's fields (see ``PROFILE_SETTABLE``); return the profile."""
        unknown = set(changes) - set(PROFILE_SETTABLE)
        if unknown:
            raise ls.ValidationError(
                f"learning_profiles: cannot set {', '.join(sorted(unknown))}; settable: {', '.join(PROFILE_SETTABLE)}"
            )
        with self.store._all_or_nothing():
            row = self._live_row(profile_id)
            row.update(changes)
            row["updated_at"] = time.time()
            self.profiles.put(row)
        return _public(row)

    def get_profile(self, profile_id: str) -> dict[str, Any] | None:
        """The profile (forgotten values read as ``ls.FORGOTTEN``), or None."""
        row = self.profiles.get(profile_id)
        return None if row is None else _public(row)

    def find_by_user(self, user_id: str) -> dict[str, Any] | None:
        """The live profile of a user id, found through the blind index; None if none (or forgotten)."""
        rows = self.profiles.find(where={"user_id": user_id}, limit=1)
        return _public(rows[0]) if rows else None

    def is_forgotten(self, profile_id: str) -> bool:
        """Whether the profile exists and was forgotten."""
        row = self.profiles.get(profile_id)
        return row is not None and row["key_salt"] is ls.FORGOTTEN

    def _live_row(self, profile_id: str) -> dict[str, Any]:
        row = self.profiles.get(profile_id)
        if row is None:
            raise ls.ValidationError(f"learning_profiles: no profile {profile_id!r} in {self.store.path}")
        if row["key_salt"] is ls.FORGOTTEN:
            raise ProfileForgottenError(
                f"learning_profiles: profile {profile_id!r} in {self.store.path} was forgotten; "
                "it cannot be written again (create a new profile)"
            )
        return row

    # -- sessions -------------------------------------------------------------------------

    def record_session(
        self,
        profile_id: str,
        *,
        session_id: str | None = None,
        started_at: float | None = None,
        ended_at: float | None = None,
        domain: str | None = None,
        topics: Iterable[str] = (),
        activities: list[Any] | None = None,
        performance: dict[str, Any] | None = None,
        notes: str | None = None,
    ) -> str:
        """Record (or replace) a learning session of a live profile; return its session_id."""
        sid = session_id or uuid.uuid4().hex
        with self.store._all_or_nothing():
            self._live_row(profile_id)
            self.sessions.put({
                "session_id": sid, "profile_id": profile_id,
                "started_at": time.time() if started_at is None else started_at, "ended_at": ended_at,
                "domain": domain, "topics": list(topics), "activities": activities or [],
                "performance": performance or {}, "notes": notes,
            })
        return sid

    def sessions_of(self, profile_id: str) -> list[dict[str, Any]]:
        """The profile's sessions, oldest first."""
        return self.sessions.find(where={"profile_id": profile_id}, order_by="started_at")

    # -- knowledge states -------------------------------------------------------------------

    def state_id(self, profile_id: str, domain: str, topic: str, *, _salt: bytes | None = None) -> str:
        """The key of a profile's (domain, topic) state: unique, stable, and opaque without the profile."""
        salt = _salt if _salt is not None else self._live_row(profile_id)["key_salt"]
        mac = hmac.new(salt, json.dumps([domain, topic]).encode(), hashlib.sha256).hexdigest()[:32]
        return f"{profile_id}:{mac}"

    def update_knowledge(
        self, profile_id: str, domain: str, topic: str, *, mastery: float, confidence: float,
        attempts: int = 1, now: float | None = None,
    ) -> dict[str, Any]:
        """Set mastery and confidence (0-1) of one (domain, topic); ``attempts`` is added to its count."""
        for name, value in (("mastery", mastery), ("confidence", confidence)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ls.ValidationError(f"knowledge_states.{name}: expected a number in [0, 1], got {value!r}")
        with self.store._all_or_nothing():
            salt = self._live_row(profile_id)["key_salt"]
            sid = self.state_id(profile_id, domain, topic, _salt=salt)
            old = self.states.get(sid)
            row = {
                "state_id": sid, "profile_id": profile_id, "domain": domain, "topic": topic,
                "mastery": float(mastery), "confidence": float(confidence),
                "attempts": (old["attempts"] if old else 0) + attempts,
                "updated_at": time.time() if now is None else now,
            }
            self.states.put(row)
        return row

    def knowledge(self, profile_id: str, domain: str | None = None) -> list[dict[str, Any]]:
        """The profile's knowledge states, optionally of one domain (filtered after decryption)."""
        rows = self.states.find(where={"profile_id": profile_id})
        return [r for r in rows if domain is None or r["domain"] == domain]

    # -- erasure, portability, expiry ---------------------------------------------------------

    def forget(self, profile_id: str, *, delete: bool = False) -> bool:
        """Crypto-shred a profile: every personal value of it, in its sessions and states too, becomes unreadable.

        Goes through ``store.forget(profile_id)``: the rows, old change-log records (and so
        what sync shipped) and backups taken earlier then hold only ciphertext whose key is
        gone. The rows stay (personal values read as ``ls.FORGOTTEN``) unless ``delete=True``,
        which deletes them too (logged, so the deletes sync). Returns whether a key was
        destroyed. Cannot run inside a transaction.
        """
        forgotten = self.store.forget(profile_id)
        if delete:
            self._delete_rows([profile_id])
        return forgotten

    def _delete_rows(self, profile_ids: list[str]) -> int:
        with self.store._all_or_nothing():
            for pid in profile_ids:
                self.sessions.delete_many(self.sessions.keys({"profile_id": pid}))
                self.states.delete_many(self.states.keys({"profile_id": pid}))
            return self.profiles.delete_many(profile_ids)

    def expire_profiles(self, now: float | None = None) -> list[str]:
        """Forget *and delete* every profile whose ``ttl_expires_at`` is at or before ``now``; return their ids.

        Forgetting first means copies in backups and the change log are unreadable too;
        deleting then removes the rows here and, through sync, centrally.
        """
        now = time.time() if now is None else now
        expired = [str(k) for k in self.profiles.keys({"ttl_expires_at": {"<=": now}})]
        for pid in expired:
            self.store.forget(pid)
        if expired:
            self._delete_rows(expired)
        return expired

    def export(self, profile_id: str) -> dict[str, Any]:
        """A JSON-ready document of everything kept about a profile: the profile, its sessions and states.

        Forgotten values are null, and each record lists them under ``"_forgotten"``.
        Bytes are given as ``{"base64": ...}``. Raises ``ValidationError`` for an unknown profile.
        """
        row = self.profiles.get(profile_id)
        if row is None:
            raise ls.ValidationError(f"learning_profiles: no profile {profile_id!r} in {self.store.path}")
        return {
            "format": EXPORT_FORMAT,
            "exported_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "profile_id": profile_id,
            "forgotten": row["key_salt"] is ls.FORGOTTEN,
            "profile": _exportable(row),
            "sessions": [_exportable(r) for r in self.sessions_of(profile_id)],
            "knowledge_states": [
                _exportable(r) for r in sorted(self.knowledge(profile_id), key=lambda r: (str(r["domain"]), str(r["topic"])))
            ],
        }

    def export_json(self, profile_id: str, path: str | os.PathLike[str] | None = None) -> str:
        """``export`` as JSON text; also written to ``path`` (mode 0600) when given."""
        text = json.dumps(self.export(profile_id), indent=2, sort_keys=True, ensure_ascii=False)
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        return text

    def import_profile(self, document: dict[str, Any] | str) -> str:
        """Load an ``export`` document (dict or JSON text) into this store; return the profile_id.

        The profile must not exist here; a forgotten profile cannot be imported.
        """
        doc = json.loads(document) if isinstance(document, str) else document
        if doc.get("format") != EXPORT_FORMAT:
            raise ls.ValidationError(f"not a learning-profile export (format {doc.get('format')!r}, expected {EXPORT_FORMAT!r})")
        if doc.get("forgotten"):
            raise ProfileForgottenError(f"profile {doc.get('profile_id')!r} was forgotten; its export cannot be imported")
        p = doc["profile"]
        pid = self.create_profile(
            p["profile_id"], user_id=p["user_id"], now=p.get("created_at"),
            **{k: p[k] for k in PROFILE_SETTABLE if k != "user_id" and p.get(k) is not None},
        )
        for s in doc.get("sessions", []):
            self.record_session(pid, **{k: v for k, v in s.items() if k in SESSION_FIELDS and k != "profile_id" and v is not None})
        for st in doc.get("knowledge_states", []):
            self.update_knowledge(pid, st["domain"], st["topic"], mastery=st["mastery"], confidence=st["confidence"],
                                  attempts=st.get("attempts") or 0, now=st.get("updated_at"))
        return pid


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in _INTERNAL}


def _exportable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    forgotten = []
    for name, value in row.items():
        if name in _INTERNAL:
            continue
        if value is ls.FORGOTTEN:
            forgotten.append(name)
            value = None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            import base64

            value = {"base64": base64.b64encode(bytes(value)).decode("ascii")}
        out[name] = value
    out["_forgotten"] = forgotten
    return out


__all__ = ["EXPORT_FORMAT", "PROFILE_SETTABLE", "LearningProfiles", "ProfileForgottenError"]
