"""Checks and preparation of a store file before its connection is made.

``open`` reads the file's header once, then: refuses a bad ``wal_damage`` option, checks
a WAL left by a crash before SQLite reads it (``walcheck``), decides whether the file
keeps page checksums (new stores do by default; see ``checksums``), refuses a file that
is not SQLite, and creates a missing one 0600. ``check_file`` runs on the new
connection before anything can change the file.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

import apsw

from . import checksums as checksums_mod
from . import schema as schema_mod
from . import walcheck
from ._sqlite import create_private_file, read_header, translate
from .errors import CorruptStoreError, StoreOpenError

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_file(conn: apsw.Connection, path: str, checksums: bool) -> None:
    """Refuse a foreign file untouched; with checksums, reserve or check the page checksum bytes."""
    schema_mod.check_store_file(conn, path)
    if checksums:
        checksums_mod.prepare(conn, path)


#: What ``open`` does with a WAL whose damage would silently drop committed transactions.
WAL_DAMAGE = ("raise", "discard")


def _check_wal(path: str, header: bytes, wal_damage: str) -> None:
    """Refuse (or, with ``wal_damage="discard"``, set aside a copy of) a WAL SQLite would silently truncate."""
    damage = walcheck.check_file(path, header)
    if damage is None:
        return
    if wal_damage == "raise":
        raise CorruptStoreError(
            f"{damage.describe()}. Nothing was changed. Restore the store from a backup (or a sync), or accept "
            f"the loss with localstore.open({path!r}, wal_damage='discard'), which keeps a copy of the WAL "
            f"as {path}-wal.damaged and opens the store as of frame {damage.kept}."
        )
    target = f"{path}-wal.damaged"
    create_private_file(target)  # 0600 from the start; an older copy is overwritten
    shutil.copyfile(f"{path}-wal", target)
    os.chmod(target, 0o600)
    log.warning("%s; a copy of the WAL is kept at %s", damage.describe(), target)


def prepare_file(
    path: str, *, vfs: str | None, checksums: bool | None, create: bool, wal_damage: str
) -> tuple[str | None, bool]:
    """Check (and if missing, create) the store file; return the VFS to open it with and whether it keeps checksums."""
    if wal_damage not in WAL_DAMAGE:
        raise StoreOpenError(f"wal_damage must be one of {', '.join(WAL_DAMAGE)}, got {wal_damage!r}")
    header = read_header(path)  # None: no file yet
    if header is not None:
        # Before SQLite reads the WAL: once it has, frames past a damaged one are gone without a trace.
        _check_wal(path, header, wal_damage)
    have = checksums_mod.available()
    if have:
        # Registered before any store connection, so every apsw connection this process
        # opens afterwards (a store's, or anyone's) keeps checksummed files' checksums current.
        checksums_mod.register()
    if checksums is None:  # the default: new stores get page checksums, unless a custom VFS was asked for
        checksums = not header and have and checksums_mod.passes_through(vfs)
    # A file that keeps page checksums is always opened through cksumvfs, so no writer
    # of ours can leave its checksums stale.
    use_checksums = bool(checksums) or (header is not None and checksums_mod.header_enabled(header))
    if use_checksums:
        if not checksums_mod.passes_through(vfs):
            raise StoreOpenError(
                f"cannot open {path}: page checksums need the {checksums_mod.VFS_NAME!r} VFS, which "
                f"vfs={vfs!r} does not declare it wraps; build it on cksumvfs (apsw.VFS(name, base="
                f"{checksums_mod.VFS_NAME!r})) and call localstore.checksums.declare_layered({vfs!r})"
            )
        vfs = vfs or checksums_mod.register()  # without cksumvfs here, this names the missing piece
    if header is None:
        if not create:
            raise StoreOpenError(f"no store at {path}: the file does not exist (localstore.open creates it unless create=False)")
        create_private_file(path)
    elif header and not header.startswith(_SQLITE_MAGIC):
        raise translate(apsw.NotADBError("file is not a database"), path, "opening")
    return vfs, use_checksums


def keys_source(source: Any, store: Store, master: bytes | None) -> Store | None:
    """For a backup: the live store whose subject keys it should use (same store id)."""
    if source is None:
        return None
    from .store import Store  # at run time, here: store imports this module

    live = source if isinstance(source, Store) else Store(source, key=master, create=False)
    if live.id != store.id:
        if live is not source:
            live.close()
        raise StoreOpenError(
            f"keys_from={live.path} is store {live.id}, but {store.path} is a copy of store {store.id}; "
            "pass the live store this backup was taken from"
        )
    return live
