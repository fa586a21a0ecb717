"""Connection set-up and the apsw error boundary.

Set-up is a list of small named steps (after ``apsw.bestpractice``), applied in
order by ``connect``. ``translate`` turns apsw exceptions into localstore ones, so
no raw apsw error (and no bare "database is locked") reaches a caller.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import msgpack
import sqlite_vec

from .errors import (
    CorruptStoreError,
    LocalStoreError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreBusyError,
    StoreOpenError,
)

#: How long one SQLite call waits on another connection's lock, in milliseconds.
#: 0 would fail at once on any contention.
DEFAULT_BUSY_TIMEOUT_MS = 5_000

#: How long a write transaction keeps retrying to begin while other writers hold
#: the store, in seconds, on top of SQLite's own busy wait. 0 means no retries.
DEFAULT_BUSY_DEADLINE_S = 60.0

#: The page cache per connection, in KiB (SQLite's negative ``cache_size``).
DEFAULT_CACHE_KIB = 32_768

DURABILITY = {"normal": "NORMAL", "full": "FULL"}

#: SQLite's VFS for Unix files, which shares descriptors (and their locks) between its users.
_UNIX_VFS = "unix"

T = TypeVar("T")


def _step_busy_timeout(conn: apsw.Connection, opts: dict[str, object]) -> None:
    conn.set_busy_timeout(int(opts.get("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS)))  # type: ignore[call-overload]


def _step_wal(conn: apsw.Connection, opts: dict[str, object]) -> None:
    mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
    if str(mode).lower() != "wal":
        conn.execute("PRAGMA journal_mode=WAL").fetchall()


def _step_synchronous(conn: apsw.Connection, opts: dict[str, object]) -> None:
    conn.execute(f"PRAGMA synchronous={DURABILITY[str(opts.get('durability', 'normal'))]}")


def _step_foreign_keys(conn: apsw.Connection, opts: dict[str, object]) -> None:
    conn.execute("PRAGMA foreign_keys=ON")


def _step_cache(conn: apsw.Connection, opts: dict[str, object]) -> None:
    conn.execute(f"PRAGMA cache_size=-{DEFAULT_CACHE_KIB}; PRAGMA temp_store=MEMORY")


def _step_sqlite_vec(conn: apsw.Connection, opts: dict[str, object]) -> None:
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)


#: The set-up steps, in order. WAL comes after the busy timeout so that switching
#: journal mode waits for other connections instead of failing.
SETUP_STEPS: list[Callable[[apsw.Connection, dict[str, object]], None]] = [
    _step_busy_timeout,
    _step_wal,
    _step_synchronous,
    _step_foreign_keys,
    _step_cache,
    _step_sqlite_vec,
]


def create_private_file(path: str) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist; return whether it was created.

    SQLite gives the -wal and -shm files the main file's permissions, so creating
    the main file 0600 ourselves makes all three private.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    except PermissionError as exc:
        raise ReadOnlyStoreError(f"cannot create store {path}: {exc.strerror}; check the folder's permissions") from None
    except FileNotFoundError:
        raise StoreOpenError(f"cannot create store {path}: its folder does not exist") from None
    os.close(fd)
    return True


def check_vfs(vfs: str | None, path: str) -> None:
    """Refuse a VFS name SQLite does not know, naming the registered ones."""
    if vfs is None:
        return
    if not isinstance(vfs, str):
        raise StoreOpenError(f"cannot open {path}: vfs must be the name of a registered SQLite VFS, got {type(vfs).__name__}")
    known = apsw.vfs_names()
    if vfs not in known:
        raise StoreOpenError(
            f"cannot open {path}: no SQLite VFS named {vfs!r} is registered (known: {', '.join(known)}); "
            "register it first (e.g. an apsw.VFS subclass) or leave vfs=None"
        )


#: Every apsw connection of this process, localstore's and raw ones, by file (a ``realpath``),
#: as weak references keyed by id: recorded by an apsw connection hook in the thread that
#: creates the connection, where apsw lets its file be read (it refuses while the connection
#: is busy in another thread). ``walcheck`` asks at every open whether a file is open here; a
#: daemon with 1,000 stores open cannot afford a scan of them all each time. Connections made
#: before the hook was installed are kept apart and asked each time.
_BY_PATH: dict[str, dict[int, weakref.ref[apsw.Connection]]] = {}
_EARLIER: list[weakref.ref[apsw.Connection]] = []
#: Re-entrant: a reference's callback may run inside a collection triggered under the lock.
_OPEN_LOCK = threading.RLock()


#: One lock per store file (a ``realpath``), held while a connection to it is made and set up,
#: and while ``walcheck`` reads its -shm: closing that descriptor while another thread's new
#: connection holds locks on the file would drop them (POSIX).
_PATH_LOCKS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def path_lock(real: str) -> Any:
    """The lock of the store file at this ``realpath``, shared by every thread of the process."""
    with _OPEN_LOCK:
        lock = _PATH_LOCKS.get(real)
        if lock is None:
            lock = _PATH_LOCKS[real] = threading.RLock()
        return lock


def _note_connection(conn: apsw.Connection) -> None:
    try:
        name = conn.filename
        real: str | None = os.path.realpath(name) if name else ""
    except Exception:  # noqa: BLE001 - a hook that raises would make the connection itself fail
        real = None
    with _OPEN_LOCK:
        if real is None:
            _EARLIER.append(weakref.ref(conn))
        elif real:
            ident = id(conn)
            _BY_PATH.setdefault(real, {})[ident] = weakref.ref(conn, lambda _ref: _forget(ident, real))


def _forget(ident: int, real: str) -> None:
    with _OPEN_LOCK:
        on_path = _BY_PATH.get(real)
        if on_path is not None:
            on_path.pop(ident, None)
            if not on_path:
                del _BY_PATH[real]


def _is_open(conn: apsw.Connection) -> bool:
    try:
        conn.filename  # noqa: B018 - asked for what it raises
    except apsw.ThreadingViolationError:
        return True  # busy in another thread
    except apsw.ConnectionClosedError:
        return False
    return True


def open_here(real_path: str) -> bool:
    """Whether an open apsw connection of this process may be on this file (a ``realpath``).

    A connection busy in another thread counts as open; one made before localstore was
    imported whose file cannot be read now (busy) counts as a maybe, on any file.
    """
    with _OPEN_LOCK:
        known = list(_BY_PATH.get(real_path, {}).values())
        earlier = list(_EARLIER)
    if any(conn is not None and _is_open(conn) for conn in (ref() for ref in known)):
        return True
    for conn in (ref() for ref in earlier):
        if conn is None:
            continue
        try:
            name = conn.filename
        except apsw.ThreadingViolationError:
            return True
        except apsw.ConnectionClosedError:
            continue
        if name and os.path.realpath(name) == real_path:
            return True
    return False


apsw.connection_hooks.append(_note_connection)
for _conn in apsw.connections():  # made before this module was imported
    _note_connection(_conn)


def connect(
    path: str,
    *,
    durability: str = "normal",
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    check: Callable[[apsw.Connection], None] | None = None,
    vfs: str | None = None,
) -> apsw.Connection:
    """Open an apsw connection to ``path`` and apply every set-up step.

    ``check`` runs right after the busy timeout is set and before anything can
    change the file (such as switching it to WAL), so it can refuse a file untouched.
    ``vfs`` names a registered SQLite VFS to open the file through (None: SQLite's default).
    """
    opts: dict[str, object] = {"durability": durability, "busy_timeout_ms": busy_timeout_ms}
    flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_NOFOLLOW
    check_vfs(vfs, path)
    with path_lock(os.path.realpath(path)):
        try:
            conn = apsw.Connection(path, flags=flags, vfs=vfs)
        except apsw.Error as exc:
            raise translate(exc, path) from None
        try:
            for step in SETUP_STEPS:
                retry_busy(lambda step=step: step(conn, opts), path=path)  # type: ignore[misc]
                if step is _step_busy_timeout and check is not None:
                    retry_busy(lambda: check(conn), path=path)
        except apsw.Error as exc:
            conn.close()
            raise translate(exc, path) from None
        except BaseException:
            conn.close()
            raise
    return conn


def translate(exc: BaseException, store: str, action: str = "") -> LocalStoreError:
    """Map an apsw exception to the matching localstore error, with the store named."""
    doing = f" while {action}" if action else ""
    if isinstance(exc, LocalStoreError):
        return exc
    if isinstance(exc, apsw.NotADBError):
        return NotAStoreError(
            f"{store} is not a SQLite database (or is encrypted by another tool){doing}; "
            "it was left untouched. Point localstore at a store file or a new path"
        )
    if isinstance(exc, apsw.CorruptError):
        return CorruptStoreError(
            f"{store} is damaged ({exc}){doing}; restore it from a backup (store.backup) "
            "or from the central Postgres (localstore restore)"
        )
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return StoreBusyError(
            f"{store} stayed locked by another writer{doing} beyond the busy timeout; "
            "retry, or raise busy_timeout_ms / shorten the other process's transactions"
        )
    if isinstance(exc, apsw.ReadOnlyError):
        return ReadOnlyStoreError(f"{store} cannot be written{doing}: {exc}; check file and folder permissions")
    if isinstance(exc, (apsw.CantOpenError, apsw.PermissionsError, apsw.AuthError)):
        return StoreOpenError(f"cannot open {store}{doing}: {exc}; check that the path and its folder are accessible")
    if isinstance(exc, apsw.FullError):
        return LocalStoreError(f"{store}: the disk is full{doing}; free space and retry (nothing was committed)")
    if isinstance(exc, apsw.IOError) and getattr(exc, "extendedresult", None) == apsw.SQLITE_IOERR_DATA:
        return CorruptStoreError(
            f"{store}: a page fails its checksum{doing} (its bytes changed on disk); restore it from a backup "
            "(store.backup) or from the central Postgres (localstore restore). If you changed the file on purpose "
            "with a tool that does not keep page checksums (the sqlite3 shell), run: localstore checksums --refresh PATH"
        )
    if isinstance(exc, apsw.IOError):
        return LocalStoreError(f"{store}: I/O error{doing} ({exc}); check the disk, then run store.verify()")
    return LocalStoreError(f"{store}: SQLite error{doing}: {exc}")


#: How long ``begin_now`` waits for the write lock: long enough for another writer's commit to
#: end, short enough that a reader with work it may skip (a vec0 catch-up) barely notices.
BEGIN_NOW_WAIT_MS = 100


def begin_now(conn: apsw.Connection, path: str, busy_timeout_ms: int) -> None:
    """BEGIN IMMEDIATE without waiting long: StoreBusyError if another connection keeps the write lock.

    ``busy_timeout_ms`` is the connection's own timeout, restored afterwards.
    """
    conn.set_busy_timeout(BEGIN_NOW_WAIT_MS)
    try:
        retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"), path=path, deadline_s=0)
    finally:
        conn.set_busy_timeout(busy_timeout_ms)


def read_header(path: str) -> bytes | None:
    """The first 100 bytes of the file (SQLite's header; fewer if it is shorter), or None if there is no file.

    Read through SQLite's unix VFS where there is one, not a descriptor of our own: closing
    that would drop every POSIX lock this process holds on the file, among them the shared
    lock each of its open connections keeps (which tells other processes the WAL is in
    use). SQLite keeps its descriptor open, for reuse, until those locks are gone.
    """
    try:
        if _UNIX_VFS not in apsw.vfs_names():
            with open(path, "rb") as stream:
                return stream.read(100)
        if stat.S_ISDIR(os.stat(path).st_mode):  # no descriptor: what is wrong, in the system's words
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreOpenError(f"cannot read {path}: {exc.strerror}") from None
    try:
        handle = apsw.VFSFile(_UNIX_VFS, path, [apsw.SQLITE_OPEN_MAIN_DB | apsw.SQLITE_OPEN_READONLY, 0])
    except apsw.Error as exc:
        raise StoreOpenError(f"cannot read {path}: {exc}") from None
    try:
        return bytes(handle.xRead(min(100, handle.xFileSize()), 0))
    except apsw.Error as exc:
        raise StoreOpenError(f"cannot read {path}: {exc}") from None
    finally:
        handle.xClose()


def retry_busy(fn: Callable[[], T], *, path: str, deadline_s: float = DEFAULT_BUSY_DEADLINE_S) -> T:
    """Call ``fn``, retrying with jittered backoff while SQLite reports the store busy.

    SQLite's busy handler already waits ``busy_timeout``; this covers the cases it
    does not (a lock upgrade, WAL recovery by another process) and long waits.
    """
    start = time.monotonic()
    pause = 0.001
    while True:
        try:
            return fn()
        except (apsw.BusyError, apsw.LockedError) as exc:
            if time.monotonic() - start >= deadline_s:
                raise translate(exc, path) from None
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.1)


class boundary:  # lower case: it replaced a function, and reads as one: ``with boundary(path, action):``
    """Re-raise any apsw error inside the block as a localstore error.

    A class rather than a ``contextlib.contextmanager``: every read and write passes
    through several of these, and a generator-based one costs about four times as much.
    """

    __slots__ = ("action", "store")

    def __init__(self, store: str, action: str = "") -> None:
        self.store, self.action = store, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None:
            return
        if isinstance(exc, apsw.Error):
            raise translate(exc, self.store, self.action) from None
        if isinstance(exc, UnicodeDecodeError):
            # apsw decodes TEXT outside its own error types: invalid UTF-8 in a stored value
            # can only come from damage to the file.
            doing = f" while {self.action}" if self.action else ""
            raise CorruptStoreError(
                f"{self.store}: a stored text value is not valid UTF-8 ({exc.reason}){doing}; the file is damaged. "
                "Run store.verify(), then restore from a backup or from Postgres"
            ) from None


def pack_values(*args: Any) -> bytes:
    """Pack alternating field names and stored values into a change payload (msgpack map).

    Registered in SQLite as ``ls_pack`` so triggers can snapshot a row as stored.
    """
    return msgpack.packb(dict(zip(args[::2], args[1::2])), use_bin_type=True)  # type: ignore[no-any-return]


def quote(identifier: str) -> str:
    """Quote an already-validated identifier for SQL."""
    return '"' + identifier.replace('"', '""') + '"'


def scalar(db: apsw.Connection, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
    """The first column of the first row of a query, or None if it returns no row."""
    row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


def created_row_state(store: Any, created: tuple[Any, int], table: str, row_id: int) -> tuple[bool, bool]:
    """Whether a row this store object inserted (``created`` = (its transaction, depth)) is still there, and committed.

    Caches of rows made inside a transaction (keys, dictionaries) ask this, since a
    rollback may have undone the row: (True, False) while the top-level transaction
    that made it is still open; otherwise the row is looked up, and it counts as
    committed once a later transaction sees it.
    """
    tx, depth = created
    if tx is store._tx and depth == 1:
        return True, False
    try:
        found = store._db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone() is not None
    except apsw.SQLError:  # the table itself was rolled back
        found = False
    return found, found and tx is not store._tx
