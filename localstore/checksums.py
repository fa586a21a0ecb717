"""Page checksums for store files (on for new stores), through SQLite's checksum VFS shim (cksumvfs).

SQLite keeps no checksum on the pages of a database file (only on WAL frames), so
a byte flipped on disk inside a plain Text or Real value reads back changed. Encrypted
values (AES-GCM tag) and compressed ones (zstd checksums, a CRC-32 on raw values) are
protected by their own formats; this module covers everything else, page by page.

How it works: cksumvfs (from SQLite's ``ext/misc``, shipped compiled by apsw as
``apsw.sqlite_extra`` "cksumvfs") keeps an 8-byte checksum in the reserved bytes at
the end of every page of a file whose header reserves exactly 8 bytes per page
(header byte 20). It writes the checksum as each page is written, to the main file
and to the WAL alike, and verifies it as each page is read; a mismatch is the error
``SQLITE_IOERR_DATA`` (apsw.IOError, extended code 8202). Files that reserve no bytes
pass through it unchanged, unchecked.

``ls.open`` creates every new store with checksums (``checksums=False`` opts out) and
registers the shim before its first connection. Use::

    from localstore import checksums
    checksums.enabled("data/kernel-7.db")   # does this store keep page checksums?
    checksums.convert("data/old.db")        # a store made before they were the default (closed): VACUUM with them
    checksums.refresh("data/kernel-7.db")   # after a deliberate change by a tool without them (sqlite3 shell)

or ``localstore checksums PATH [--convert | --refresh]``.

Rules that follow from the design (they are SQLite's):

- ``register()`` makes the shim SQLite's default VFS for the whole process (that is
  what the extension does on load), so every connection opened afterwards that writes
  a checksummed file, localstore's or anyone's in this process, keeps its checksums
  current. Register before opening a checksummed store anywhere in the process: a
  connection opened earlier, or a writer in another program that does not load
  cksumvfs (the ``sqlite3`` shell, a sync daemon started without it), leaves stale
  checksums behind, which then read as damage. Readers without the shim read the
  file normally, unchecked.
- The reserve is fixed when a file is created or vacuumed; ``convert`` rewrites the file.
- Backups made with ``store.backup`` copy pages with their checksums and stay checked.
- A page that fails is reported by SQLite as an I/O error (``SQLITE_IOERR_DATA``);
  ``is_checksum_error`` tells it from a failing disk.

Cost, measured in one run against the same store opened without the shim (20,000
rows, load average 8.5 on 2 cores): put_many 0.99x, cold ``get`` 1.15x, full scan
1.04x. A pass-through VFS written in Python with apsw, computing only a CRC-32 of
each page (no storing, no checking yet), already cost 1.20x on put_many and 1.46x
on cold gets, which is why this module uses the C shim and not a Python one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import apsw

from ._sqlite import create_private_file, read_header
from .errors import LocalStoreError, StoreOpenError

#: The name cksumvfs registers itself under.
VFS_NAME = "cksmvfs"

#: Bytes reserved at the end of every page for the checksum; cksumvfs checks files with exactly 8.
RESERVE_BYTES = 8

#: The extended result code of a page whose checksum fails (SQLITE_IOERR_DATA).
IOERR_DATA = apsw.SQLITE_IOERR_DATA

#: Offset of the "reserved bytes per page" byte in a SQLite file header.
_RESERVE_OFFSET = 20

_lock = threading.Lock()


class ChecksumsUnavailableError(LocalStoreError):
    """This installation has no cksumvfs (an apsw without ``sqlite_extra``); checksums cannot be turned on."""


def available() -> bool:
    """Whether cksumvfs can be loaded here (apsw ships it as a ``sqlite_extra`` extension)."""
    if VFS_NAME in apsw.vfs_names():
        return True
    try:
        from apsw import sqlite_extra
    except ImportError:
        return False
    return sqlite_extra.has("cksumvfs") == "extension"


def register() -> str:
    """Load cksumvfs into this process (once) and return its VFS name, for ``ls.open(..., vfs=...)``."""
    with _lock:
        if VFS_NAME in apsw.vfs_names():
            return VFS_NAME
        if not available():
            raise ChecksumsUnavailableError(
                f"page checksums need SQLite's cksumvfs, which this apsw {apsw.apsw_version()} does not ship "
                "(apsw.sqlite_extra has no 'cksumvfs'); upgrade apsw, or open the store without checksums"
            )
        from apsw import sqlite_extra

        loader = apsw.Connection(":memory:")
        try:
            sqlite_extra.load(loader, "cksumvfs")
        finally:
            loader.close()
        if VFS_NAME not in apsw.vfs_names():
            raise ChecksumsUnavailableError(f"loading cksumvfs did not register a VFS named {VFS_NAME!r}")
        return VFS_NAME


#: VFS names declared to pass every call through cksumvfs (see ``declare_layered``).
_layered: set[str] = set()


def declare_layered(name: str) -> None:
    """Declare that the registered VFS ``name`` is built on cksumvfs (``apsw.VFS(name, base=VFS_NAME)``).

    Checksummed stores may then be opened with ``vfs=name`` (a fault-injecting shim in
    tests, say): every page still passes through cksumvfs, which keeps the checksums.
    """
    if name not in apsw.vfs_names():
        raise StoreOpenError(f"no SQLite VFS named {name!r} is registered; register it before declaring it")
    _layered.add(name)


def passes_through(vfs: str | None) -> bool:
    """Whether opening with ``vfs`` (None: the default) keeps page checksums current."""
    return vfs is None or vfs == VFS_NAME or vfs in _layered


def reserve_bytes(path: str | os.PathLike[str]) -> int | None:
    """The reserved bytes per page of a SQLite file (8: checksummed), or None if it has no header yet."""
    where = os.fspath(path)
    header = read_header(where)  # not Python's open(): its close would drop this process's locks on the file
    if header is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None
    return header[_RESERVE_OFFSET]


def header_enabled(header: bytes) -> bool:
    """Whether a file whose first 100 bytes are ``header`` keeps page checksums."""
    return len(header) >= 100 and header.startswith(b"SQLite format 3\x00") and header[_RESERVE_OFFSET] == RESERVE_BYTES


def enabled(path: str | os.PathLike[str]) -> bool:
    """Whether a store file keeps page checksums."""
    return reserve_bytes(path) == RESERVE_BYTES


def _set_reserve(conn: apsw.Connection, where: str) -> None:
    wanted = ctypes.c_int(RESERVE_BYTES)
    if not conn.file_control("main", apsw.SQLITE_FCNTL_RESERVE_BYTES, ctypes.addressof(wanted)):
        raise LocalStoreError(f"{where}: SQLite refused to reserve {RESERVE_BYTES} bytes per page for checksums")


def prepare(conn: apsw.Connection, path: str) -> None:
    """Connection set-up step for ``open(..., checksums=True)``: reserve checksum bytes in a new file, or check them.

    Call it right after the connection is opened through ``register()``'s VFS and before
    anything writes (the WAL switch included): on a file with no pages yet, the reserve
    takes effect with the first page written. An existing file without checksums is
    refused, naming ``convert``; rewriting it silently would be a surprise VACUUM.
    """
    pages = conn.execute("PRAGMA page_count").fetchall()[0][0]
    if pages == 0:
        _set_reserve(conn, path)
        return
    if reserve_bytes(path) != RESERVE_BYTES:
        raise StoreOpenError(
            f"{path} has no page checksums (it was created without them); close it everywhere and run "
            "localstore.checksums.convert(path) once (it rewrites the file), or open it without checksums=True"
        )


def create(path: str | os.PathLike[str]) -> None:
    """Create a new, empty SQLite file (mode 0600) whose pages will carry checksums; ``ls.open`` then fills it."""
    where = os.fspath(path)
    register()
    if os.path.exists(where) and os.path.getsize(where):
        raise StoreOpenError(f"{where} already exists; use checksums.convert() for an existing store")
    create_private_file(where)
    conn = apsw.Connection(where, vfs=VFS_NAME)
    try:
        _set_reserve(conn, where)
        # Writing the header fixes the reserve; the store's own set-up (WAL, tables) follows in ls.open.
        conn.execute("PRAGMA user_version = 0; CREATE TABLE _ls_cksum(x); DROP TABLE _ls_cksum")
    finally:
        conn.close()
    if not enabled(where):
        raise LocalStoreError(f"{where}: the file was created without room for page checksums")


def convert(path: str | os.PathLike[str]) -> None:
    """Rewrite an existing store (closed, no other connection) so that its pages carry checksums.

    This VACUUMs the file: it takes as long as copying it, needs as much free space,
    and rewrites every page, each now with its checksum.
    """
    where = os.fspath(path)
    register()
    if enabled(where):
        return
    _vacuum(where, lambda conn: _set_reserve(conn, where), "rewrite the store with page checksums")
    if not enabled(where):
        raise LocalStoreError(f"{where}: VACUUM kept the old page layout; page checksums are not on")


def refresh(path: str | os.PathLike[str]) -> None:
    """Recompute every page's checksum of a closed store after a deliberate change made without them.

    For a file changed on purpose by a program that does not load cksumvfs (the
    ``sqlite3`` shell, another language's SQLite): its pages then read as damaged. This
    VACUUMs the file with checking off, so every page is rewritten with a fresh checksum.
    It also makes real damage read as valid: if nobody changed the file on purpose,
    restore it from a backup instead.
    """
    where = os.fspath(path)
    register()
    if not enabled(where):
        raise StoreOpenError(f"{where} keeps no page checksums; there is nothing to refresh")
    _vacuum(where, lambda conn: conn.execute("PRAGMA checksum_verification = OFF"),
            "rewrite the store's page checksums")


def _vacuum(where: str, prepare: Callable[[apsw.Connection], Any], what: str) -> None:
    """VACUUM a closed store through cksumvfs, after ``prepare`` set the connection up; every page is rewritten."""
    conn = apsw.Connection(where, vfs=VFS_NAME, flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
        # A WAL file cannot change its page layout in place: VACUUM in rollback mode, then switch back.
        conn.execute("PRAGMA journal_mode = DELETE")
        prepare(conn)
        conn.execute("VACUUM")
        conn.execute(f"PRAGMA journal_mode = {mode}")
    except apsw.Error as exc:
        raise LocalStoreError(f"{where}: could not {what} ({exc}); close every connection to it and retry") from None
    finally:
        conn.close()


def is_checksum_error(exc: BaseException) -> bool:
    """Whether an apsw error is a page failing its checksum (for mapping it to ``CorruptStoreError``)."""
    return isinstance(exc, apsw.IOError) and getattr(exc, "extendedresult", None) == IOERR_DATA
