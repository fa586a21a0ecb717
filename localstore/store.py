"""A store: one agent's SQLite file, its collections, transactions and change log.

Threading model: a ``Store`` owns one apsw connection guarded by a re-entrant
lock. Every call takes the lock for its duration, and ``store.transaction()``
holds it for the whole ``with`` block, so a store object may be shared by
threads: their operations are serialised, and a transaction in one thread never
sees another thread's half-done work. For parallel reads, open the same file
once per thread or process; SQLite's WAL lets readers and one writer proceed
together, and writers in other processes wait their turn (busy timeout plus
retries), never surfacing "database is locked".
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import apsw

from . import clock, opening, walcheck
from . import schema as schema_mod
from ._sqlite import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DURABILITY,
    begin_now,
    boundary,
    check_vfs,
    connect,
    pack_values,
    read_header,
    retry_busy,
    scalar,
)
from .derived import DerivedIndexes
from .errors import (
    InvalidNameError,
    LocalStoreError,
    SchemaError,
    StoreClosedError,
    StoreOpenError,
    UnknownCollectionError,
)
from .fields import Field
from .vector_caches import VectorCaches
from .wal_checkpointer import WAL_CHECKPOINT_MODES, WalCheckpointer

if TYPE_CHECKING:
    from .changelog import ChangeLog
    from .collection import Collection
    from .maintenance import StoreStats, VerifyReport

#: The change log's last seq, its newest record's clock and the clock floor (read once per transaction).
CHANGE_LOG_POSITION = ("SELECT (SELECT value FROM _ls_meta WHERE key='last_seq'), (SELECT hlc FROM _ls_changes "
                       "ORDER BY seq DESC LIMIT 1), (SELECT value FROM _ls_meta WHERE key='hlc_floor')")


@dataclass
class _TxState:
    """Sequence and clock positions handed out inside the current write transaction."""

    last_seq: int | None = None
    last_hlc: int = 0
    #: The value of ``last_seq`` when it was read from the file; the counter is written back at commit.
    stored_seq: int | None = None
    #: Vector writes to apply to the in-memory caches once the transaction commits:
    #: (collection, field, [(rowid, stored vector or None), ...]).
    vector_deltas: list[tuple[str, str, list[tuple[int, Any, Any]]]] = field(default_factory=list)


class Store:
    """One agent's store: a WAL-mode SQLite file holding collections and a change log.

    Open one with ``localstore.open(path)``. Use it as a context manager, or call
    ``close()`` when done.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "normal",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        create: bool = True,
        vector_cache: bool = True,
        key: str | bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        keys_from: str | os.PathLike[str] | Store | None = None,
        max_messages_per_key: int | None = None,
        vfs: str | None = None,
        checksums: bool | None = None,
        wal_damage: str = "raise",
        wal_checkpoint: str = "auto",
    ) -> None:
        self.path = os.fspath(path)
        from .keys import DEFAULT_MAX_MESSAGES, KeyRing, resolve_master

        master = resolve_master(key, key_file)  # key file checks (0600) run before the store is touched
        if durability not in DURABILITY:
            raise StoreOpenError(f"durability must be one of {', '.join(DURABILITY)}, got {durability!r}")
        if not isinstance(wal_checkpoint, str) or wal_checkpoint not in WAL_CHECKPOINT_MODES:
            raise StoreOpenError(f"wal_checkpoint must be one of {', '.join(WAL_CHECKPOINT_MODES)}, got {wal_checkpoint!r}")
        check_vfs(vfs, self.path)  # before the file is created, so a typo leaves nothing behind
        if os.path.isdir(self.path):
            raise StoreOpenError(f"{self.path} is a directory; a store is a single file, e.g. {self.path}/agent.db")
        vfs, use_checksums = opening.prepare_file(self.path, vfs=vfs, checksums=checksums, create=create, wal_damage=wal_damage)
        self.durability = durability
        self.vfs = vfs
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.RLock()
        self._conn: apsw.Connection | None = connect(
            self.path, durability=durability, busy_timeout_ms=busy_timeout_ms, vfs=vfs,
            check=lambda conn: opening.check_file(conn, self.path, use_checksums),
        )
        try:
            with boundary(self.path, "opening"):
                self._conn.create_scalar_function("ls_pack", pack_values, deterministic=True)
                self.id: str = retry_busy(lambda: schema_mod.init_store(self._db, self.path), path=self.path)
                self._keys = KeyRing(
                    self, master, max_messages=max_messages_per_key or DEFAULT_MAX_MESSAGES,
                    keys_from=opening.keys_source(keys_from, self, master),
                )
                self._keys.check_master()  # a wrong master key fails here, before any data is read
                self.wal_checkpoint = wal_checkpoint
                self._wal: WalCheckpointer | None = None
                if wal_checkpoint == "background":
                    self._wal = WalCheckpointer(self.path, durability=durability, vfs=vfs)
                    self._wal.install(self._conn)
        except BaseException:
            wal = getattr(self, "_wal", None)
            if wal is not None:
                wal.close()
            self._conn.close()
            self._conn = None
            raise
        self._depth = 0
        #: Inside ``_all_or_nothing``: the depth from which nested blocks open no savepoint (0: none).
        self._flat_from, self._flat_failed = 0, False
        self._tx: _TxState | None = None
        self._collections: dict[str, Collection] = {}
        self._schema_version = -1
        # Set when a rollback may have undone schema work or temporary triggers that the
        # cached collections rely on; the next call reloads them.
        self._stale = False
        self._clock_last = 0
        self._changelog: ChangeLog | None = None
        self.vector_cache = bool(vector_cache)
        self._vectors = VectorCaches(self, self.vector_cache)
        from .dictionaries import Dictionaries

        self._dicts = Dictionaries(self)

    # -- basics -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The store's file name without its folder and ``.db`` suffix."""
        return os.path.basename(self.path).removesuffix(".db")

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""
        return self._conn is None

    @property
    def _db(self) -> apsw.Connection:
        conn = self._conn
        if conn is None:
            raise StoreClosedError(f"store {self.path} is closed; open it again with localstore.open()")
        return conn

    def close(self) -> None:
        """Close the store. Safe to call twice; a store in a transaction is rolled back first."""
        with self._lock:
            if self._conn is None:
                return
            conn, self._conn = self._conn, None
            if self._wal is not None:  # first, so the writer's close is the last one and removes the WAL
                self._wal.close()
            if self._depth:
                with contextlib.suppress(apsw.Error):
                    conn.execute("ROLLBACK")
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<localstore.Store {self.path!r} id={self.id} {state}>"

    # -- collections -----------------------------------------------------------------

    def collection(
        self,
        name: str,
        key: str | None = None,
        fields: Mapping[str, Field | type[Field]] | None = None,
        *,
        sync: bool = True,
        ttl: float | None = None,
    ) -> Collection:
        """Declare a collection (with ``key`` and ``fields``), or reopen one (name only).

        A redeclaration may add fields and change index options; changing the key,
        a field's type or its other options raises ``SchemaError``. ``sync=False``
        keeps the collection out of the change log; ``ttl`` (seconds) lets
        ``expire()`` delete rows older than that.
        """
        from .collection import Collection

        if not isinstance(name, str):
            raise InvalidNameError(f"a collection name must be a str, got {type(name).__name__} {name!r}")
        with self._lock:
            with boundary(self.path, f"opening collection {name!r}"):
                if not self._depth:
                    retry_busy(self._refresh_schemas, path=self.path)
            if fields is None and key is None:
                coll = self._collections.get(name)
                if coll is not None:
                    return coll
                with boundary(self.path, f"opening collection {name!r}"):
                    found = schema_mod.load_schema(self._db, name)
                if found is None:
                    existing = ", ".join(self.collections()) or "none yet"
                    raise UnknownCollectionError(
                        f"store {self.path} has no collection {name!r} (collections: {existing}); "
                        "declare it with key= and fields="
                    )
                coll = Collection(self, found)
                self._collections[found.name] = coll
                return coll
            if fields is None or key is None:
                raise SchemaError(f"collection {name!r}: pass both key= and fields= to declare it, or neither to reopen it")
            with self.transaction(), boundary(self.path, f"declaring collection {name!r}"):
                previous = schema_mod.load_schema(self._db, name)
                declared = schema_mod.declare(self._db, name, key, dict(fields), sync=sync, ttl=ttl)
                DerivedIndexes(declared).ensure(self._db, previous)
            coll = self._collections.get(declared.name)
            if coll is None:
                coll = Collection(self, declared)
                self._collections[declared.name] = coll
            else:
                coll._set_schema(declared)
            return coll

    def collections(self) -> list[str]:
        """The names of the store's collections, in creation order."""
        with self._lock, boundary(self.path, "listing collections"):
            return schema_mod.list_collections(self._db)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.collections()

    def _refresh_schemas(self) -> None:
        """Reload cached collections if another connection changed the schema or a rollback undid ours."""
        db = self._db
        version = scalar(db, "PRAGMA schema_version")
        if version == self._schema_version and not self._stale:
            return
        self._stale = False
        for name, coll in list(self._collections.items()):
            fresh = schema_mod.load_schema(db, name)
            if fresh is None:
                del self._collections[name]  # its declaration was rolled back
            else:
                coll._set_schema(fresh)
        self._schema_version = scalar(db, "PRAGMA schema_version")

    # -- transactions ----------------------------------------------------------------

    def transaction(self) -> contextlib.AbstractContextManager[Store]:
        """An atomic block over any number of collections; nests through savepoints.

        Any exception (including KeyboardInterrupt) rolls the block back and is
        re-raised. Other threads using this store object wait until it ends.
        """
        return self._transaction(wait=True)

    @contextlib.contextmanager
    def _transaction(self, *, wait: bool) -> Iterator[Store]:
        """``transaction()``; ``wait=False`` waits only ``BEGIN_NOW_WAIT_MS`` for another writer, then raises ``StoreBusyError``."""
        with self._lock:
            db = self._db
            if self._depth == 0:
                with boundary(self.path, "starting a write transaction"):
                    if wait:
                        retry_busy(lambda: db.execute("BEGIN IMMEDIATE"), path=self.path)
                    else:
                        begin_now(db, self.path, self._busy_timeout_ms)
                self._depth, self._tx = 1, _TxState()
                try:
                    with boundary(self.path, "writing"):
                        self._refresh_schemas()
                    yield self
                except BaseException:
                    with contextlib.suppress(apsw.Error):
                        db.execute("ROLLBACK")
                    self._stale = True
                    raise
                else:
                    try:
                        with boundary(self.path, "committing"):
                            tx = self._tx
                            if tx is not None and tx.last_seq is not None and tx.last_seq != tx.stored_seq:
                                db.execute("UPDATE _ls_meta SET value = ? WHERE key = 'last_seq'", (tx.last_seq,))
                            retry_busy(lambda: db.execute("COMMIT"), path=self.path)
                        if tx is not None and tx.vector_deltas:
                            self._vectors.apply(tx.vector_deltas)
                        if self._wal is not None:
                            self._wal.after_commit(db)
                    except BaseException:
                        with contextlib.suppress(apsw.Error):
                            db.execute("ROLLBACK")
                        self._stale = True
                        raise
                finally:
                    self._depth, self._tx = 0, None
                    self._reload_after_rollback()
            elif self._flat_from and self._depth >= self._flat_from:
                self._depth += 1  # an error undoes the enclosing all-or-nothing block, this one with it
                try:
                    yield self
                except BaseException:
                    self._flat_failed = True  # in case something inside catches it and goes on
                    raise
                finally:
                    self._depth -= 1
            else:
                assert self._tx is not None
                tx = self._tx
                savepoint = f"_ls_sp{self._depth}"
                saved = (tx.last_seq, tx.last_hlc)
                saved_deltas = len(tx.vector_deltas)
                with boundary(self.path, "opening a savepoint"):
                    db.execute(f"SAVEPOINT {savepoint}")
                self._depth += 1
                try:
                    yield self
                except BaseException:
                    with contextlib.suppress(apsw.Error):
                        db.execute(f"ROLLBACK TO {savepoint}; RELEASE {savepoint}")
                    tx.last_seq, tx.last_hlc = saved
                    del tx.vector_deltas[saved_deltas:]
                    self._keys.drop_reservation()
                    self._stale = True
                    self._reload_after_rollback()
                    raise
                else:
                    with boundary(self.path, "releasing a savepoint"):
                        db.execute(f"RELEASE {savepoint}")
                finally:
                    self._depth -= 1

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[Store]:
        """A ``transaction()`` whose nested blocks open no savepoints of their own (for the kits).

        Only for code that lets every error out, which undoes the whole block; code that catches
        an error inside and goes on (an importer skipping a bad row) must use ``transaction()``.
        """
        with self.transaction():
            if self._flat_from:  # inside another one, which does the checking
                yield self
                return
            self._flat_from, self._flat_failed = self._depth, False
            try:
                yield self
                if self._flat_failed:
                    raise LocalStoreError(f"store {self.path}: an error inside an all-or-nothing block was caught "
                                          "and ignored; the whole block was rolled back")
            finally:
                self._flat_from = 0

    def _reload_after_rollback(self) -> None:
        """Bring cached collections back in line with the file after a rollback undid schema work."""
        if self._stale and self._conn is not None:
            # On failure the store stays marked stale and the next call retries.
            with contextlib.suppress(apsw.Error, LocalStoreError):
                self._refresh_schemas()

    # -- vector caches and derived indexes ---------------------------------------------

    def reindex(self, collection: str | None = None) -> dict[str, dict[str, int]]:
        """Rebuild the derived vec0 and FTS5 indexes from the rows; return rows indexed per index."""
        names = [collection] if collection is not None else self.collections()
        out: dict[str, dict[str, int]] = {}
        with self.transaction(), boundary(self.path, "reindexing"):
            for name in names:
                coll = self.collection(name)
                out[name] = coll._derived.rebuild(self._db)
        self._vectors.clear()
        return out

    @property
    def in_transaction(self) -> bool:
        """Whether a ``transaction()`` block is open on this store."""
        return self._depth > 0

    def _allocate(self, count: int, logged: bool) -> tuple[int, int]:
        """Reserve ``count`` change seqs (if ``logged``) and HLC values; return the first of each.

        Must be called inside a write transaction, which holds SQLite's write lock,
        so positions read from the file cannot be taken by another process.
        """
        tx = self._tx
        assert tx is not None, "_allocate outside a transaction"
        db = self._db
        if tx.last_seq is None:
            with boundary(self.path, "reading the change-log position"):
                row = db.execute(CHANGE_LOG_POSITION).fetchone() or (None, None, None)
            tx.last_seq = tx.stored_seq = int(row[0] or 0)
            tx.last_hlc = max(int(row[1] or 0), int(row[2] or 0), self._clock_last)
        first_hlc = clock.next_hlc(tx.last_hlc)
        tx.last_hlc = first_hlc + count - 1
        self._clock_last = max(self._clock_last, tx.last_hlc)
        first_seq = tx.last_seq + 1
        if logged:
            tx.last_seq += count
        return first_seq, first_hlc

    # -- change log and maintenance (implemented in their own modules) -------------------

    @property
    def changelog(self) -> ChangeLog:
        """The change log API the sync engine uses: read, acknowledge, prune."""
        from .changelog import ChangeLog

        if self._changelog is None:
            self._changelog = ChangeLog(self)
        return self._changelog

    def backup(self, path: str | os.PathLike[str], *, progress: Any = None) -> str:
        """Write an online, consistent copy of the store to ``path`` (SQLite backup API); return the path."""
        from .maintenance import backup

        return backup(self, os.fspath(path), progress=progress)

    def verify(self) -> VerifyReport:
        """Check SQLite integrity, the schema, and the change log against the data; return a report."""
        from .maintenance import verify

        report = verify(self)
        damage = walcheck.check_live(self.path, read_header(self.path))
        if damage is not None:
            report.problems.append(f"{damage.describe()}; readers see unchecked frames: restore from a backup")
        return report

    def optimize(self, *, vacuum: bool | None = None) -> dict[str, Any]:
        """Rebuild fragmented vector indexes, refresh statistics, vacuum if worth it, truncate the WAL.

        ``vacuum=True``/``False`` forces or skips the vacuum; None decides by the free-page share.
        """
        from .maintenance import optimize

        return optimize(self, vacuum=vacuum)

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Delete rows older than their collection's TTL; return the count deleted per collection."""
        from .maintenance import expire

        return expire(self, now)

    def stats(self) -> StoreStats:
        """Collections, row counts, sizes and pending changes."""
        from .maintenance import stats

        return stats(self)

    def _run(self, fn: Any, action: str) -> Any:
        """Run a read under the store lock with busy retries and wrapped errors."""
        with self._lock, boundary(self.path, action):
            db = self._db
            if not self._depth:
                retry_busy(self._refresh_schemas, path=self.path)
            return retry_busy(lambda: fn(db), path=self.path)

    # -- keys: rotation, re-encryption, forgetting (see keys.py and docs/privacy.md) ------------

    def rotate_key(self, new_master: str | bytes) -> int:
        """Re-wrap every key of this store under a new master key; return how many keys were re-wrapped.

        Values are not touched and stay readable throughout; from the commit on, the
        store opens only with ``new_master``. Call ``reencrypt()`` as well to move
        values onto a fresh data key.
        """
        from .keys import rotate

        return rotate(self, new_master)

    def reencrypt(self, *, batch: int = 1000) -> int:
        """Re-encrypt every value not under the newest data key, with a new data key; return the rows rewritten.

        Rows are rewritten through ``put_many`` (so the change log and sync carry the
        new ciphertext), ``batch`` rows per transaction. Values of subjects keep their
        subject's key; rows holding forgotten values are left as they are.
        """
        from .codecs import reencrypt

        self._outside_transaction("reencrypt")
        return reencrypt(self, batch)

    def forget(self, subject: str | int) -> bool:
        """Destroy the key of one subject (crypto-shredding); return whether it had one.

        Every value encrypted under it, in this file, its change log, backups taken
        earlier and Postgres, becomes unreadable: reads give ``localstore.FORGOTTEN``
        and blind-index lookups no longer match. The key's bytes are zeroed in the file
        and the WAL is checkpointed; this cannot be undone.
        """
        from .errors import ValidationError
        from .keys import checkpoint_truncate

        if isinstance(subject, bool) or not isinstance(subject, (str, int)):
            raise ValidationError(f"store {self.path}: forget takes a subject id (str or int), got {type(subject).__name__}")
        self._outside_transaction("forget")
        with self.transaction():
            count = self._keys.forget(subject)
        with self._lock, boundary(self.path, "checkpointing after forget"):
            self._db.execute("PRAGMA secure_delete=OFF")
        checkpoint_truncate(self, "checkpointing after forget")
        return count > 0

    def _wal_idle(self) -> contextlib.AbstractContextManager[object]:
        """Hold off the background checkpointer (if any): SQLite refuses a second checkpoint rather than wait."""
        return self._wal.idle() if self._wal is not None else contextlib.nullcontext()

    def _outside_transaction(self, what: str) -> None:
        with self._lock:  # under the lock, an open transaction can only be this thread's own
            in_transaction = self._depth > 0
        if in_transaction:
            raise LocalStoreError(
                f"store {self.path}: {what}() cannot run inside a transaction (a rollback would leave keys "
                "cached that the file no longer has); call it after the block"
            )


def open(
    path: str | os.PathLike[str],
    *,
    durability: str = "normal",
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    create: bool = True,
    vector_cache: bool = True,
    key: str | bytes | None = None,
    key_file: str | os.PathLike[str] | None = None,
    keys_from: str | os.PathLike[str] | Store | None = None,
    max_messages_per_key: int | None = None,
    vfs: str | None = None,
    checksums: bool | None = None,
    wal_damage: str = "raise",
    wal_checkpoint: str = "auto",
) -> Store:
    """Open one agent's store at ``path``, creating it (mode 0600) if missing.

    ``durability="full"`` makes every commit survive power loss (``synchronous=FULL``);
    the default ``"normal"`` survives process crashes and is several times faster.
    ``vector_cache=False`` answers ``nearest`` through sqlite-vec alone instead of an
    in-memory copy of each vector field (less memory, slower exact scans).

    Encrypted fields need the master key: ``key`` (base64 text or 32 bytes), else
    ``$LOCALSTORE_KEY``, else a key file (``key_file`` or ``$LOCALSTORE_KEY_FILE``,
    mode 0600). A wrong key raises ``WrongKeyError`` here. ``keys_from`` opens a
    backup with the subject keys of its live store; ``max_messages_per_key`` caps
    the values encrypted per data key (default 2^30) before a new key is made.
    ``vfs`` opens the file through a registered SQLite VFS (an ``apsw.VFS``
    subclass, e.g. a fault-injecting shim in tests); its backups use it too.
    New stores keep a checksum on every page (SQLite's cksumvfs): a flipped byte
    anywhere is then a ``CorruptStoreError``, not a changed value. ``checksums=False``
    creates one without (as does a custom ``vfs``); ``checksums=True`` insists (an
    existing store without them is refused). A file made with checksums is always
    opened with them; convert an older store with ``localstore.checksums.convert(path)``.

    A WAL left by a crash is checked before SQLite reads it: if a damaged frame would
    make SQLite silently drop transactions committed after it, ``open`` raises
    ``CorruptStoreError`` and changes nothing (see ``localstore.walcheck``).
    ``wal_damage="discard"`` accepts the loss instead: it keeps a copy of the WAL as
    ``PATH-wal.damaged`` and opens the store as of the last intact commit.

    ``wal_checkpoint="background"`` moves WAL checkpoints out of the commits into a
    thread with its own connection (see ``localstore.wal_checkpointer``): commits of
    large rows get much faster, durability stays the same, the WAL is bounded (64 MiB
    by default, reused); the default ``"auto"`` is SQLite's own checkpoint in the
    commit that passes 1,000 pages.
    """
    return Store(
        path, durability=durability, busy_timeout_ms=busy_timeout_ms, create=create, vector_cache=vector_cache,
        key=key, key_file=key_file, keys_from=keys_from, max_messages_per_key=max_messages_per_key, vfs=vfs,
        checksums=checksums, wal_damage=wal_damage, wal_checkpoint=wal_checkpoint,
    )


__all__ = ["LocalStoreError", "Store", "open"]
