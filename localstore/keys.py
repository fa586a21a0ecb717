"""Keys: the master key, each store's wrapped data keys, per-subject keys, rotation and forgetting.

The hierarchy::

    master key (argument, LOCALSTORE_KEY or a 0600 key file; never stored)
      -> key-encryption key = HKDF(master, salt = store id)        derived once per open
           -> wraps every row of _ls_keys:
                root     HMAC secret for blind-index keys and subject lookups (never encrypts values)
                data     AES-256-GCM keys for values; a new one when the message cap is reached
                subject  one AES-256-GCM key per subject (``subject="profile_id"``); ``forget`` destroys it

The table, created with the first encrypted write::

    _ls_keys(id INTEGER PRIMARY KEY,    -- the key id in every value's header (fits 32 bits)
             kind TEXT,                 -- 'root' | 'data' | 'subject'
             lookup BLOB,               -- subject keys: HMAC(root, subject); NULL once forgotten
             state TEXT,                -- 'live' | 'forgotten' | 'withheld' (a backup's copy)
             wrapped BLOB,              -- nonce + AES-GCM(kek, key); NULL unless live
             messages INTEGER,          -- values encrypted so far (reserved in blocks of 4,096)
             created_hlc INTEGER)

Backups carry the root and data keys (so a backup and the master key read every
non-subject value) but not the subject keys: those are ``withheld`` in the copy,
which is how ``forget`` reaches values in backups taken earlier. Open a backup with
``keys_from=<live store path>`` to read subject values that are not forgotten.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from typing import TYPE_CHECKING, Any

import apsw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import clock, crypto
from ._sqlite import boundary, created_row_state
from .errors import KeyFileError, MissingKeyError, WrongKeyError

if TYPE_CHECKING:
    from .store import Store

#: Values encrypted under one data key before a new one is made. NIST SP 800-38D
#: limits random 96-bit nonces to 2^32 messages per key; 2^30 keeps the chance of a
#: nonce collision below 2^-35. Must be at least 1.
DEFAULT_MAX_MESSAGES = 2**30

#: Messages reserved in ``_ls_keys.messages`` at a time, so the counter is written
#: once per block rather than once per value.
DEFAULT_RESERVE_BLOCK = 4096

#: The environment variables read when ``open`` gets no key: a base64 master key,
#: or the path of a key file (mode 0600) holding one.
ENV_KEY = "LOCALSTORE_KEY"
ENV_KEY_FILE = "LOCALSTORE_KEY_FILE"

KEYS_DDL = """
CREATE TABLE IF NOT EXISTS _ls_keys(
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    lookup BLOB,
    state TEXT NOT NULL,
    wrapped BLOB,
    messages INTEGER NOT NULL DEFAULT 0,
    created_hlc INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS _ls_keys_lookup ON _ls_keys(lookup) WHERE lookup IS NOT NULL;
"""


class _Forgotten:
    """The value read in place of a field whose subject was forgotten (``localstore.FORGOTTEN``).

    Its key was destroyed by ``store.forget(subject)``; the stored bytes can no
    longer be decrypted by anyone. It is falsy and compares equal only to itself.
    """

    _instance: _Forgotten | None = None

    def __new__(cls) -> _Forgotten:  # noqa: PYI034 - the one instance, even for a subclass
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "localstore.FORGOTTEN"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "FORGOTTEN"


#: The sentinel returned for values whose subject was forgotten.
FORGOTTEN = _Forgotten()
Forgotten = _Forgotten


def generate_key() -> str:
    """A new random 256-bit master key, base64-encoded (for ``LOCALSTORE_KEY`` or a key file)."""
    return base64.b64encode(os.urandom(crypto.KEY_BYTES)).decode("ascii")


def write_key_file(path: str | os.PathLike[str], key: str | bytes | None = None) -> str:
    """Write a master key (a new one if None) to ``path`` with mode 0600; refuse to overwrite; return the path."""
    path = os.fspath(path)
    material = _parse_key(key, "the key argument") if key is not None else os.urandom(crypto.KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; it was left unchanged") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(material).decode("ascii") + "\n")
    return path


def _parse_key(key: Any, source: str) -> bytes:
    """Turn 32 raw bytes or a base64 string into a master key; never echo the key in an error."""
    if isinstance(key, (bytes, bytearray, memoryview)) and len(key) == crypto.KEY_BYTES:
        return bytes(key)
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key).decode("ascii", "replace")
    if not isinstance(key, str):
        raise KeyFileError(f"{source} must be 32 bytes or a base64 string of 32 bytes, not {type(key).__name__}")
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source} is not valid base64 (expected 32 bytes, base64-encoded)") from None
    if len(raw) != crypto.KEY_BYTES:
        raise KeyFileError(f"{source} decodes to {len(raw)} bytes; a master key is 32 bytes (base64, 44 characters)")
    return raw


def read_key_file(path: str) -> bytes:
    """Read a master key from a file that only its owner can read (mode 0600 or 0400)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others can read it, so it "
            f"was refused. Make it private with: chmod 600 {path}"
        )
    with open(path, "rb") as handle:
        data = handle.read(4096)
    if len(data) == crypto.KEY_BYTES and not data.strip().isascii():
        return data
    return _parse_key(data.decode("ascii", "replace"), f"key file {path}")


def resolve_master(key: Any, key_file: str | os.PathLike[str] | None) -> bytes | None:
    """The master key from ``key``, else ``LOCALSTORE_KEY``, else a key file (argument or ``LOCALSTORE_KEY_FILE``)."""
    if key is not None:
        return _parse_key(key, "the key= argument")
    env = os.environ.get(ENV_KEY)
    if env:
        return _parse_key(env, f"${ENV_KEY}")
    path = key_file if key_file is not None else os.environ.get(ENV_KEY_FILE)
    if path:
        return read_key_file(os.fspath(path))
    return None


def table_exists(db: apsw.Connection, name: str) -> bool:
    """Whether the store has an internal table of this name."""
    return db.execute("SELECT 1 FROM sqlite_schema WHERE type='table' AND name=?", (name,)).fetchone() is not None


def withhold_subject_keys(db: apsw.Connection) -> None:
    """In a backup copy: drop every subject key's material (zeroed on disk), keeping its id as 'withheld'."""
    if not table_exists(db, "_ls_keys"):
        return
    db.execute("PRAGMA secure_delete=ON")
    db.execute("PRAGMA journal_mode=MEMORY")  # no journal file keeps the old pages
    db.execute("UPDATE _ls_keys SET wrapped = NULL, lookup = NULL, state = 'withheld' WHERE kind = 'subject' AND state = 'live'")
    db.execute("PRAGMA journal_mode=DELETE")


class KeyRing:
    """One open store's keys: unwrapped once, cached for the life of the ``Store``.

    Thread-safety: writes run under the store lock; reads may race to fill the
    caches, which is harmless (the same key is unwrapped twice).
    """

    def __init__(
        self, store: Store, master: bytes | None, *, max_messages: int = DEFAULT_MAX_MESSAGES,
        keys_from: Store | None = None,
    ) -> None:
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages_per_key must be a positive int, got {max_messages!r}")
        self.store = store
        self.max_messages = max_messages
        self._kek = crypto.derive(master, "localstore key-encryption key v1", store.id.encode()) if master else None
        self.keys_from = keys_from
        self._ciphers: dict[int, AESGCM] = {}
        self._secrets: dict[int, bytes] = {}
        self._forgotten: set[int] = set()
        self._root: tuple[int, bytes] | None = None
        self._subjects: dict[bytes, int] = {}
        #: Keys this object inserted: id -> (transaction, depth). Until a later
        #: transaction sees them in the file they may have been rolled back.
        self._created: dict[int, tuple[Any, int]] = {}
        self._current: int | None = None
        self._used = 0
        self._reserved = 0
        self._reserve_tx: Any = None
        self._generation: Any = None
        self._data_version: Any = None
        self._blind_cache: dict[tuple[int, str], bytes] = {}

    @property
    def has_master(self) -> bool:
        """Whether a master key was given when the store was opened."""
        return self._kek is not None

    # -- open --------------------------------------------------------------------------

    def check_master(self) -> None:
        """At open: prove the master key unwraps this store's root key, before any data is read."""
        if self._kek is None:
            return
        db = self.store._db
        if not table_exists(db, "_ls_keys"):
            return
        # The generation first: a rotation committed after this read is noticed by refresh().
        generation = db.execute("SELECT value FROM _ls_meta WHERE key = 'keys_generation'").fetchone()
        row = db.execute("SELECT id, wrapped FROM _ls_keys WHERE kind='root' ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return
        try:
            secret = crypto.unwrap(self._kek, row[1], self._context(int(row[0])))
        except crypto.DecryptFailed:
            raise WrongKeyError(
                f"store {self.store.path}: the master key given does not unlock this store's keys (wrong key, "
                "or a key for another store); nothing was read. Pass the key the store was created with"
            ) from None
        self._root = (int(row[0]), secret)
        self._generation = generation[0] if generation else 0

    def _context(self, key_id: int) -> bytes:
        return f"ls-key1\x00{self.store.id}\x00{key_id}".encode()

    def _need_master(self, what: str) -> bytes:
        if self._kek is None:
            raise MissingKeyError(
                f"store {self.store.path}: {what} needs the master key, and none was given. Pass "
                f"localstore.open(path, key=...), set ${ENV_KEY} (base64) or ${ENV_KEY_FILE} (a 0600 file)"
            )
        return self._kek

    # -- freshness ---------------------------------------------------------------------

    def _still_there(self, key_id: int) -> bool:
        """Whether a key this object created is still in the file (a rollback may have undone it)."""
        created = self._created.get(key_id)
        if created is None:
            return True
        found, committed = created_row_state(self.store, created, "_ls_keys", key_id)
        if committed:
            del self._created[key_id]  # a later transaction sees it: it was committed
        if not found:
            self._drop(key_id)
        return found

    def _drop(self, key_id: int) -> None:
        self._created.pop(key_id, None)
        self._ciphers.pop(key_id, None)
        self._secrets.pop(key_id, None)
        if self._root is not None and self._root[0] == key_id:
            self._root = None
            self._subjects.clear()
            self._blind_cache.clear()
        if self._current == key_id:
            self._current = None
        for lookup, kid in list(self._subjects.items()):
            if kid == key_id:
                del self._subjects[lookup]
        for k in [k for k in self._blind_cache if k[0] == key_id]:
            del self._blind_cache[k]

    def refresh(self) -> None:
        """Drop cached subject keys if another connection forgot or re-wrapped keys since the last look."""
        db = self.store._db
        version = db.execute("PRAGMA data_version").fetchone()[0]  # type: ignore[index]
        if version == self._data_version:
            return
        self._data_version = version
        row = db.execute("SELECT value FROM _ls_meta WHERE key = 'keys_generation'").fetchone()
        generation = row[0] if row else 0
        if self._generation is not None and generation != self._generation:
            self._subjects.clear()
            self._blind_cache.clear()
            for kid in [k for k in self._ciphers if k not in self._created]:
                self._ciphers.pop(kid, None)
                self._secrets.pop(kid, None)
            self._current = None
            created = None if self._root is None else self._created.get(self._root[0])
            if self._root is not None and (created is None or created[0] is not self.store._tx):
                # Unwrapped again (from the file) before the next new key: if another connection rotated
                # the master key, that fails (WrongKeyError) instead of wrapping a new key under the old
                # one. Only a root made by the transaction now open is kept as it is.
                self._root = None
        self._generation = generation

    def _bump_generation(self) -> None:
        db = self.store._db
        db.execute(
            "INSERT INTO _ls_meta(key, value) VALUES('keys_generation', 1) "
            "ON CONFLICT(key) DO UPDATE SET value = value + 1"
        )

    # -- writing: keys for new values ----------------------------------------------------

    def _insert(self, kind: str, lookup: bytes | None) -> tuple[int, bytes]:
        kek = self._need_master(f"encrypting (creating a {kind} key)")
        db = self.store._db
        db.execute(KEYS_DDL)
        secret = os.urandom(crypto.KEY_BYTES)
        db.execute(
            "INSERT INTO _ls_keys(kind, lookup, state, wrapped, messages, created_hlc) VALUES(?, ?, 'live', x'', 0, ?)",
            (kind, lookup, clock.wall_hlc()),
        )
        key_id = int(db.last_insert_rowid())
        if key_id >= 2**32:
            raise MissingKeyError(f"store {self.store.path}: key ids are exhausted")
        db.execute("UPDATE _ls_keys SET wrapped = ? WHERE id = ?", (crypto.wrap(kek, secret, self._context(key_id)), key_id))
        self._created[key_id] = (self.store._tx, self.store._depth)
        self._secrets[key_id] = secret
        self._ciphers[key_id] = AESGCM(secret)
        return key_id, secret

    def root(self, create: bool) -> bytes | None:
        """The root secret (for blind-index and subject lookups); made with the first encrypted write."""
        if self._root is not None and self._still_there(self._root[0]):
            return self._root[1]
        self._root = None
        db = self.store._db
        row = None
        if table_exists(db, "_ls_keys"):
            row = db.execute("SELECT id, wrapped FROM _ls_keys WHERE kind='root' ORDER BY id LIMIT 1").fetchone()
        if row is not None:
            kek = self._need_master("reading encrypted values")
            try:
                self._root = (int(row[0]), crypto.unwrap(kek, row[1], self._context(int(row[0]))))
            except crypto.DecryptFailed:
                raise WrongKeyError(
                    f"store {self.store.path}: the master key does not unlock this store's keys (another connection "
                    "may have rotated it: reopen the store with the new key)"
                ) from None
        elif create:
            self._root = self._insert("root", None)
        return None if self._root is None else self._root[1]

    def data_key(self) -> tuple[int, AESGCM]:
        """The data key for the next value (inside a write transaction); rotates at the message cap."""
        if (
            self._used >= self._reserved
            or self._reserve_tx is not self.store._tx
            or (self._current in self._created and not self._still_there(self._current or 0))
        ):
            self._reserve()
        self._used += 1
        assert self._current is not None
        return self._current, self._ciphers[self._current]

    def _reserve(self) -> None:
        db = self.store._db
        self.root(create=True)
        block = min(DEFAULT_RESERVE_BLOCK, self.max_messages)
        row = db.execute(
            "SELECT id, messages FROM _ls_keys WHERE kind='data' AND state='live' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None or int(row[1]) + block > self.max_messages:
            key_id, _ = self._insert("data", None)
        else:
            key_id = int(row[0])
            self._load(key_id)
        db.execute("UPDATE _ls_keys SET messages = messages + ? WHERE id = ?", (block, key_id))
        self._current, self._used, self._reserved, self._reserve_tx = key_id, 0, block, self.store._tx

    def drop_reservation(self) -> None:
        """After a savepoint rollback, which may have undone the reservation in the file: reserve afresh."""
        self._reserve_tx = None

    def new_data_key(self) -> int:
        """Start a new data key now (used by ``reencrypt``); later values use it."""
        self.root(create=True)
        key_id, _ = self._insert("data", None)
        self._current, self._used, self._reserved, self._reserve_tx = key_id, 0, 0, None
        return key_id

    def _lookup(self, subject: Any, create: bool) -> bytes | None:
        root = self.root(create)
        if root is None:
            return None
        kind = "i" if isinstance(subject, int) and not isinstance(subject, bool) else "s"
        return crypto.subkey(root, f"subject\x00{kind}{subject}")

    def subject_key(self, subject: Any) -> tuple[int, AESGCM]:
        """The key of one subject (inside a write transaction), made on first use."""
        lookup = self._lookup(subject, create=True)
        assert lookup is not None
        key_id = self._subjects.get(lookup)
        if key_id is not None and self._still_there(key_id):
            return key_id, self._ciphers[key_id]
        row = self.store._db.execute(
            "SELECT id FROM _ls_keys WHERE lookup = ? AND state = 'live' ORDER BY id DESC LIMIT 1", (lookup,)
        ).fetchone()
        if row is not None:
            key_id = int(row[0])
            self._load(key_id)
        else:
            key_id, _ = self._insert("subject", lookup)
        self._subjects[lookup] = key_id
        return key_id, self._ciphers[key_id]

    # -- reading -----------------------------------------------------------------------

    def _load(self, key_id: int) -> AESGCM | None:
        """Unwrap one key by id into the cache; None if it was forgotten. ``MissingKeyError`` if unavailable."""
        cipher = self._ciphers.get(key_id)
        if cipher is not None:
            return cipher
        if key_id in self._forgotten:
            return None
        db = self.store._db
        row = None
        if table_exists(db, "_ls_keys"):
            row = db.execute("SELECT kind, state, wrapped FROM _ls_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise MissingKeyError(f"store {self.store.path}: key {key_id} is not in this store's key table "
                                  "(the table was altered or damaged); restore the store from a backup or a sync")
        _kind, state, wrapped = row
        if state == "forgotten":
            self._forgotten.add(key_id)
            return None
        if state == "withheld":
            if self.keys_from is None:
                raise MissingKeyError(
                    f"store {self.store.path}: subject key {key_id} is withheld from backups; open the backup with "
                    "keys_from=<path of the live store> to read subject values"
                )
            cipher = self.keys_from._keys.cipher(key_id)
            if cipher is None:
                self._forgotten.add(key_id)
                return None
            self._secrets[key_id] = self.keys_from._keys._secrets[key_id]
            self._ciphers[key_id] = cipher
            return cipher
        kek = self._need_master("reading encrypted values")
        try:
            secret = crypto.unwrap(kek, wrapped, self._context(key_id))
        except crypto.DecryptFailed:
            raise MissingKeyError(
                f"store {self.store.path}: key {key_id} does not unwrap with the master key this store was opened with: another connection "
                "rotated the master key (reopen with the new one), or the key table was altered"
            ) from None
        self._secrets[key_id] = secret
        self._ciphers[key_id] = cipher = AESGCM(secret)
        return cipher

    def cipher(self, key_id: int) -> AESGCM | None:
        """The cipher for a key id in a value's header; None if its subject was forgotten."""
        cipher = self._ciphers.get(key_id)
        if cipher is not None:
            return cipher
        with self.store._lock, boundary(self.store.path, "loading a key"):
            return self._load(key_id)

    # -- blind index -------------------------------------------------------------------

    def blind_key(self, label: str, subject_key_id: int | None, create: bool) -> bytes | None:
        """The HMAC key of one field's blind index: from the root key, or from a subject's key."""
        cache_key = (subject_key_id if subject_key_id is not None else -1, label)
        found = self._blind_cache.get(cache_key)
        if found is not None:
            return found
        if subject_key_id is None:
            secret = self.root(create)
        else:
            self._load(subject_key_id)
            secret = self._secrets.get(subject_key_id)
        if secret is None:
            return None
        self._blind_cache[cache_key] = key = crypto.subkey(secret, f"blind\x00{label}")
        return key

    def live_subject_ids(self) -> list[int]:
        """The ids of every live subject key (for blind-index lookups over subject fields)."""
        db = self.store._db
        if not table_exists(db, "_ls_keys"):
            return []
        return [int(r[0]) for r in db.execute("SELECT id FROM _ls_keys WHERE kind='subject' AND state IN ('live', 'withheld')")]

    # -- management ----------------------------------------------------------------------

    def forget(self, subject: Any) -> int:
        """Destroy the keys of one subject (inside a write transaction); return how many were destroyed."""
        lookup = self._lookup(subject, create=False)
        if lookup is None:
            return 0
        db = self.store._db
        ids = [int(r[0]) for r in db.execute("SELECT id FROM _ls_keys WHERE lookup = ?", (lookup,))]
        if not ids:
            return 0
        db.execute("PRAGMA secure_delete=ON")
        db.execute(
            "UPDATE _ls_keys SET wrapped = NULL, lookup = NULL, state = 'forgotten' WHERE lookup = ?", (lookup,)
        )
        self._bump_generation()
        for key_id in ids:
            self._drop(key_id)
            self._forgotten.add(key_id)
        return len(ids)

    def rewrap(self, new_master: bytes) -> int:
        """Re-wrap every live key under a new master key (inside a write transaction); return the count."""
        old = self._need_master("rotating the master key")
        new = crypto.derive(new_master, "localstore key-encryption key v1", self.store.id.encode())
        db = self.store._db
        if not table_exists(db, "_ls_keys"):
            # No key yet: make the root key now, under the new master key, so that from this commit
            # on the store opens only with it (else the old key would still open it, and bind it).
            # The new key is used only once the transaction commits (commit_rewrap).
            self._kek = new
            try:
                self.root(create=True)
            finally:
                self._kek = old
            self._pending_kek = new
            return 0
        rows: list[Any] = db.execute("SELECT id, wrapped FROM _ls_keys WHERE state = 'live'").fetchall()
        db.execute("PRAGMA secure_delete=ON")
        for key_id, wrapped in rows:
            try:
                secret = crypto.unwrap(old, wrapped, self._context(int(key_id)))
            except crypto.DecryptFailed:
                raise WrongKeyError(f"store {self.store.path}: key {key_id} does not unwrap with the current master key") from None
            db.execute("UPDATE _ls_keys SET wrapped = ? WHERE id = ?", (crypto.wrap(new, secret, self._context(int(key_id))), key_id))
        self._bump_generation()
        self._pending_kek = new
        return len(rows)

    def commit_rewrap(self) -> None:
        """After the re-wrapping transaction committed: use the new master key from now on."""
        new = getattr(self, "_pending_kek", None)
        if new is not None:
            self._kek = new
            del self._pending_kek

    def current_data_key(self) -> int | None:
        """The id of the newest live data key, or None before the first encrypted write."""
        db = self.store._db
        if not table_exists(db, "_ls_keys"):
            return None
        row = db.execute("SELECT max(id) FROM _ls_keys WHERE kind='data' AND state='live'").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def kind_of(self, key_id: int) -> str | None:
        """'data', 'subject' or 'root' for a key id, or None if unknown."""
        db = self.store._db
        if not table_exists(db, "_ls_keys"):
            return None
        row = db.execute("SELECT kind FROM _ls_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else str(row[0])


def checkpoint_truncate(store: Store, action: str) -> bool:
    """Checkpoint the WAL and truncate it, so destroyed key bytes leave the WAL; False if readers blocked it.

    Holds the store's lock, with its background checkpointer (if any) held off: SQLite
    refuses a second checkpoint rather than wait for the first.
    """
    with store._lock, store._wal_idle(), boundary(store.path, action), contextlib.suppress(apsw.Error):
        row = store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return row is not None and row[0] == 0
    return False


def rotate(store: Store, new_master: str | bytes) -> int:
    """``Store.rotate_key``: re-wrap every key under ``new_master``, then clear the old wrapping from the WAL."""
    new = _parse_key(new_master, "new_master")
    store._outside_transaction("rotate_key")
    with store.transaction():
        count = store._keys.rewrap(new)
    store._keys.commit_rewrap()
    checkpoint_truncate(store, "checkpointing after a key rotation")
    return count
