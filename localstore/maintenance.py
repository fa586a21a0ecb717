"""Store maintenance: online backup, verification, optimize/vacuum, TTL expiry and stats."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import apsw

from . import checksums, clock
from . import schema as schema_mod
from ._sqlite import boundary, create_private_file, quote, retry_busy, scalar, translate
from .collection import OP_DELETE, OP_PUT
from .derived import DerivedIndexes
from .errors import BackupError, CorruptStoreError, LocalStoreError
from .keys import withhold_subject_keys
from .vectors import NO_HIGH_WATER

if TYPE_CHECKING:
    from .store import Store

#: Pages copied per backup step; between steps the progress callback runs.
DEFAULT_BACKUP_PAGES = 4096

#: Rows deleted per statement by ``expire()``.
DEFAULT_EXPIRE_BATCH = 5_000


def backup(store: Store, path: str, *, progress: Callable[[int, int], Any] | None = None) -> str:
    """Copy the store to ``path`` through the SQLite backup API, consistently, while writers run.

    The copy is written to a temporary file (mode 0600) and renamed into place,
    so ``path`` is either the old file or a complete backup. It holds a committed
    prefix of the store's history: the state as of one transaction boundary.
    ``progress(done_pages, total_pages)`` is called as pages are copied.
    """
    path = os.fspath(path)
    if os.path.abspath(path) == os.path.abspath(store.path):
        raise BackupError(f"backup target {path} is the store itself; choose another path")
    if os.path.isdir(path):
        raise BackupError(f"backup target {path} is a directory; give a file path such as {path}/copy.db")
    tmp = f"{path}.tmp-{os.getpid()}"
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp + suffix)
    try:
        create_private_file(tmp)
    except LocalStoreError as exc:
        raise BackupError(f"cannot write backup {path}: {exc}") from None
    try:
        with store._lock:
            # Under the lock, an open transaction can only be this thread's own.
            if store.in_transaction:
                raise BackupError(
                    f"store {store.path}: backup cannot run inside this store's own transaction; call it after the block"
                )
            source = store._db
            if store.vfs == checksums.VFS_NAME and checksums.enabled(store.path):
                # cksumvfs learns that a file keeps checksums from its first page; a fresh,
                # empty copy would take pages spilled before page 1 without them.
                checksums.create(tmp)
            with boundary(tmp, "opening the backup file"):
                dest = apsw.Connection(tmp, vfs=store.vfs)
            try:
                with boundary(store.path, "taking a backup"):
                    # One step copies everything under one read snapshot: writers in
                    # other processes carry on (WAL) and the copy is consistent.
                    with dest.backup("main", source, "main") as job:
                        retry_busy(lambda: job.step(-1), path=store.path)
                        if progress is not None:
                            progress(job.page_count, job.page_count)
                    dest.execute("PRAGMA journal_mode=DELETE")
                    withhold_subject_keys(dest)  # so forget() later reaches this copy too (keys.py)
            except SystemError as exc:
                # apsw's backup object can report a failed final step this way under I/O faults.
                raise BackupError(f"backup of {store.path} to {path} failed: {exc}") from None
            finally:
                with contextlib.suppress(apsw.Error):
                    dest.close()
        # A WAL left beside an older copy would be replayed onto the new file and
        # corrupt it, so it goes before the new copy takes the name.
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
        os.replace(tmp, path)
    except BaseException:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp + suffix)
        raise
    return path


@dataclass
class VerifyReport:
    """The result of ``store.verify()``: ``ok`` is True when ``problems`` is empty."""

    path: str
    store_id: str
    integrity: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    collections: dict[str, int] = field(default_factory=dict)
    changes: int = 0
    last_seq: int = 0
    watermark: int = 0

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return {
            "path": self.path, "store_id": self.store_id, "ok": self.ok, "integrity": self.integrity,
            "problems": self.problems, "collections": self.collections, "changes": self.changes,
            "last_seq": self.last_seq, "watermark": self.watermark,
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {'ok' if self.ok else 'PROBLEMS FOUND'}"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify(store: Store) -> VerifyReport:
    """Run ``integrity_check`` and check schemas and the change log against the rows."""
    with store._lock, boundary(store.path, "verifying"):
        db = store._db
        report = VerifyReport(store.path, store.id)
        if store.in_transaction:  # already a consistent view: this transaction's own
            _verify_in_snapshot(store, db, report)
            return report
        db.execute("BEGIN")
        try:
            _verify_in_snapshot(store, db, report)
        finally:
            try:
                db.execute("COMMIT")
            except apsw.Error:  # a read on damaged pages can leave the snapshot unable to commit
                with contextlib.suppress(apsw.Error):
                    db.execute("ROLLBACK")
        return report


def _verify_in_snapshot(store: Store, db: apsw.Connection, report: VerifyReport) -> None:
    try:
        report.integrity = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
    except apsw.IOError as exc:
        if not checksums.is_checksum_error(exc):
            raise
        # A checksummed store stops at the first damaged page: that is the finding.
        report.integrity = [f"a page fails its checksum ({exc})"]
        report.problems.append("integrity_check: a page fails its checksum (its bytes changed on disk); "
                               "restore a backup")
        return
    if report.integrity != ["ok"]:
        report.problems += [f"integrity_check: {line}" for line in report.integrity]
        _name_damaged_trees(db, report)
    try:
        _verify_contents(store, db, report)
    except (apsw.CorruptError, CorruptStoreError, UnicodeDecodeError) as exc:
        # The later checks read the damaged pages; the report already names them.
        if report.integrity == ["ok"]:
            raise
        report.problems.append(f"further checks stopped at damaged data ({exc}); restore from a backup")


def _name_damaged_trees(db: apsw.Connection, report: VerifyReport) -> None:
    """Turn integrity_check's b-tree root pages ("Tree 8") into the tables and indexes they hold."""
    import re

    roots = sorted({int(m) for line in report.integrity for m in re.findall(r"Tree (\d+)", line)})
    with contextlib.suppress(apsw.Error):
        for root in roots:
            found = db.execute("SELECT type, name FROM sqlite_schema WHERE rootpage = ?", (root,)).fetchone()
            if found is not None:
                report.problems.append(
                    f"damaged {found[0]} {found[1]!r} (tree {root}): "
                    + ("rebuild it with REINDEX or restore a backup" if found[0] == "index" else "restore a backup")
                )


def _verify_contents(store: Store, db: apsw.Connection, report: VerifyReport) -> None:
    fk = db.execute("PRAGMA foreign_key_check").fetchall()
    if fk:
        report.problems.append(f"foreign_key_check found {len(fk)} violations")
    report.last_seq = store.changelog.last_seq()  # knows this transaction's unwritten counter
    report.watermark = int(scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='watermark'), 0)"))
    report.changes = int(scalar(db, "SELECT count(*) FROM _ls_changes"))
    if report.watermark > report.last_seq:
        report.problems.append(f"watermark {report.watermark} is beyond the last seq {report.last_seq}")
    pruned = _pruned_through(db)
    kept = scalar(db, "SELECT count(*) FROM _ls_changes WHERE seq > ?", (pruned,))
    if kept != report.last_seq - pruned:
        report.problems.append(
            f"the change log should hold every seq from {pruned + 1} to {report.last_seq} "
            f"({report.last_seq - pruned} records) but holds {kept}: change records are missing"
        )
    max_seq = scalar(db, "SELECT max(seq) FROM _ls_changes")
    if max_seq is not None and max_seq > report.last_seq:
        report.problems.append(f"change seq {max_seq} is beyond the sequence counter {report.last_seq}")
    bad_hlc = scalar(db, 
        "SELECT count(*) FROM (SELECT hlc, lag(hlc) OVER (ORDER BY seq) AS prev FROM _ls_changes) WHERE hlc <= prev"
    )
    if bad_hlc:
        report.problems.append(f"{bad_hlc} change records have an HLC not above their predecessor's")
    known = set()
    for name in schema_mod.list_collections(db):
        sch = schema_mod.load_schema(db, name)
        if sch is None:
            report.problems.append(f"collection {name!r} cannot be loaded")
            continue
        known.add(sch.id)
        _verify_collection(db, sch, report)
    orphans = scalar(db, f"SELECT count(*) FROM _ls_changes WHERE coll NOT IN ({','.join(map(str, known)) or 'NULL'})")
    if orphans:
        report.problems.append(f"{orphans} change records name no known collection")
    from .codecs import damaged_values  # the codec layer sits above this module

    # integrity_check sees pages, not values: a value failing its checksum or AEAD tag is
    # found only by decoding it.
    try:
        report.problems += damaged_values(store)
    except (CorruptStoreError, apsw.CorruptError, UnicodeDecodeError):
        raise  # _verify_in_snapshot reports these against integrity_check's findings
    except LocalStoreError as exc:
        if report.ok:
            raise
        report.problems.append(f"the stored values could not be checked after the problems above ({exc})")


def _verify_derived(db: apsw.Connection, sch: schema_mod.CollectionSchema, report: VerifyReport) -> None:
    """The vec0 and FTS5 indexes hold exactly the rows that have values (``store.reindex()`` repairs them)."""
    derived = DerivedIndexes(sch)
    for name, index in derived.vectors.items():
        try:
            indexed = int(scalar(db, f"SELECT count(*) FROM {index.table}"))
        except apsw.SQLError:
            report.problems.append(f"collection {sch.name!r}: the vector index of {name!r} is missing; run store.reindex()")
            continue
        # Rows above the index's high-water rowid wait for its next catch-up: pending, not missing.
        through = index.indexed_through(db)
        above = 0
        if through < NO_HIGH_WATER:
            above = int(scalar(db, f"SELECT count(*) FROM {index.rowids_table} WHERE rowid > ?", (through,)))
        rows = int(scalar(db, f"SELECT count(*) FROM {sch.table} WHERE {quote(name)} IS NOT NULL AND rowid <= ?",
                          (through,)))
        if indexed - above != rows:
            report.problems.append(
                f"collection {sch.name!r}: the vector index of {name!r} holds {indexed - above} entries for {rows} "
                f"rows (up to rowid {through}); run store.reindex()"
                if through < NO_HIGH_WATER else
                f"collection {sch.name!r}: the vector index of {name!r} holds {indexed} entries for {rows} rows; "
                "run store.reindex()"
            )
    if derived.fulltext is not None:
        fts = derived.fulltext
        try:
            indexed = int(scalar(db, f"SELECT count(*) FROM {fts.table}"))
        except apsw.SQLError:
            report.problems.append(f"collection {sch.name!r}: the full-text index is missing; run store.reindex()")
            return
        present = " OR ".join(f"{quote(n)} IS NOT NULL" for n in fts.fields)
        rows = int(scalar(db, f"SELECT count(*) FROM {sch.table} WHERE {present}"))
        if indexed != rows:
            report.problems.append(
                f"collection {sch.name!r}: the full-text index holds {indexed} entries for {rows} rows; run store.reindex()"
            )


def _pruned_through(db: apsw.Connection) -> int:
    return int(scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='pruned_through'), 0)"))


def _verify_collection(db: apsw.Connection, sch: schema_mod.CollectionSchema, report: VerifyReport) -> None:
    table = sch.table
    exists = db.execute("SELECT 1 FROM sqlite_schema WHERE type='table' AND name=?", (sch.name,)).fetchone()
    if not exists:
        report.problems.append(f"collection {sch.name!r}: its table is missing")
        return
    columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    missing = [c for c in (*sch.fields, *schema_mod.SYSTEM_COLUMNS) if c not in columns]
    if missing:
        report.problems.append(f"collection {sch.name!r}: columns missing from its table: {', '.join(missing)}")
        return
    report.collections[sch.name] = int(scalar(db, f"SELECT count(*) FROM {table}"))
    _verify_derived(db, sch, report)
    key = quote(sch.key)
    if not sch.sync:
        return
    # Every row's last change is a put of that key (unless that record was pruned).
    floor = _pruned_through(db) + 1
    bad_rows = scalar(db, 
        f"SELECT count(*) FROM {table} t WHERE t._ls_seq IS NULL OR (t._ls_seq >= ? AND NOT EXISTS ("
        f"SELECT 1 FROM _ls_changes c WHERE c.seq = t._ls_seq AND c.coll = ? AND c.key = t.{key} AND c.op = {OP_PUT}))",
        (floor, sch.id),
    )
    if bad_rows:
        report.problems.append(f"collection {sch.name!r}: {bad_rows} rows have no matching change record")
    # The newest change of each key agrees with the table: put <=> row present with that seq.
    # A row pulled from another store after this key's newest local change legitimately
    # differs from it (replica.py records such rows in _ls_origin).
    pulled_later = ""
    if scalar(db, "SELECT 1 FROM sqlite_schema WHERE name = '_ls_origin'"):
        pulled_later = " AND NOT EXISTS (SELECT 1 FROM _ls_origin o WHERE o.coll = c.coll AND o.key = last.key AND o.hlc > c.hlc)"
    mismatched = scalar(db,
        f"SELECT count(*) FROM (SELECT key, max(seq) AS seq FROM _ls_changes WHERE coll = ? GROUP BY key) last "
        f"JOIN _ls_changes c ON c.seq = last.seq LEFT JOIN {table} t ON t.{key} = last.key "
        f"WHERE ((c.op = {OP_PUT} AND (t._ls_seq IS NULL OR t._ls_seq != c.seq)) OR (c.op = {OP_DELETE} AND t.{key} IS NOT NULL))"
        + pulled_later,
        (sch.id,),
    )
    if mismatched:
        report.problems.append(f"collection {sch.name!r}: {mismatched} keys whose newest change disagrees with the row")
    dangling = scalar(db, 
        f"SELECT count(*) FROM _ls_changes c WHERE c.coll = ? AND c.op = {OP_PUT} AND c.payload IS NULL AND NOT EXISTS ("
        f"SELECT 1 FROM {table} t WHERE t.{key} = c.key AND t._ls_seq = c.seq)",
        (sch.id,),
    )
    if dangling:
        report.problems.append(f"collection {sch.name!r}: {dangling} change records lost their row payload")


#: Free pages, as a share of the file, above which ``optimize()`` vacuums on its own.
DEFAULT_VACUUM_FREE_SHARE = 0.2


def optimize(store: Store, *, vacuum: bool | None = None) -> dict[str, Any]:
    """Give space back and refresh planner statistics; return what was done.

    Vector indexes that keep many deleted slots (sqlite-vec never reuses them) are
    rebuilt from the rows; the others index the rows waiting for their catch-up. ``vacuum=None`` vacuums when free pages exceed
    ``DEFAULT_VACUUM_FREE_SHARE`` of the file; True or False forces the choice.
    The WAL is checkpointed and truncated last.
    """
    with store._lock, boundary(store.path, "optimizing"):
        db = store._db
        if store.in_transaction:
            raise LocalStoreError(f"store {store.path}: optimize cannot run inside a transaction")
        rebuilt = []
        with store.transaction():
            for name in schema_mod.list_collections(db):
                derived = store.collection(name)._derived
                if derived.vectors and derived.fragmented(db):
                    derived.rebuild(db)
                    rebuilt.append(name)
                else:
                    derived.catch_up(db)  # index rows waiting above each vec0 high-water mark
        db.execute("PRAGMA optimize")
        if vacuum is None:
            pages = int(scalar(db, "PRAGMA page_count") or 0)
            free = int(scalar(db, "PRAGMA freelist_count") or 0)
            vacuum = pages > 0 and free / pages > DEFAULT_VACUUM_FREE_SHARE
        if vacuum:
            retry_busy(lambda: db.execute("VACUUM"), path=store.path)
        with store._wal_idle():  # a background checkpointer mid-pass would make SQLite skip this one
            retry_busy(lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall(), path=store.path)
        return {"rebuilt_indexes": rebuilt, "vacuumed": bool(vacuum)}


def expire(store: Store, now: float | None = None) -> dict[str, int]:
    """Delete rows older than their collection's TTL (by write time); return counts by collection.

    Deletes are logged like any other, so sync removes the rows centrally too.
    """
    now = time.time() if now is None else now
    out: dict[str, int] = {}
    for name in store.collections():
        coll = store.collection(name)
        ttl = coll.schema.ttl
        if ttl is None:
            continue
        cutoff = int((now - ttl) * 1000) << clock.LOGICAL_BITS
        total = 0
        sql = f"SELECT {quote(coll.key)} FROM {coll.schema.table} WHERE _ls_hlc < ? LIMIT {DEFAULT_EXPIRE_BATCH}"
        while True:
            with store.transaction():
                with boundary(store.path, f"expiring {name!r}"):
                    keys = [r[0] for r in store._db.execute(sql, (cutoff,))]
                deleted = coll._delete_checked(keys) if keys else 0
            total += deleted
            if len(keys) < DEFAULT_EXPIRE_BATCH:
                break
        out[name] = total
    return out


@dataclass
class StoreStats:
    """Sizes and counts of a store, as shown by ``localstore stats``."""

    path: str
    store_id: str
    file_bytes: int
    wal_bytes: int
    collections: dict[str, dict[str, Any]]
    last_seq: int
    watermark: int
    pending_changes: int
    history_changes: int

    def as_dict(self) -> dict[str, Any]:
        """The stats as a JSON-serialisable dict."""
        return dict(self.__dict__)


def stats(store: Store) -> StoreStats:
    """Collect a store's collections, row counts, sizes and change-log positions."""
    with store._lock, boundary(store.path, "reading stats"):
        db = store._db
        per: dict[str, dict[str, Any]] = {}
        sizes: dict[str, int] = {}
        with contextlib.suppress(apsw.SQLError):  # dbstat may be compiled out
            sizes = {n: int(s) for n, s in db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")}
        for name in schema_mod.list_collections(db):
            sch = schema_mod.load_schema(db, name)
            if sch is None:
                continue
            rows = int(scalar(db, f"SELECT count(*) FROM {sch.table}"))
            per[name] = {
                "rows": rows,
                "bytes": sizes.get(name, 0) + sum(v for k, v in sizes.items() if k.startswith(f"_ls_ix.{name}.")),
                "key": sch.key,
                "fields": {f: spec.describe() for f, spec in sch.fields.items()},
                "sync": sch.sync,
                "ttl": sch.ttl,
                # Rows with a vector that wait for their vec0 index's next catch-up, per vector field.
                "vector_index_waiting": {
                    f: int(scalar(db, f"SELECT count(*) FROM {sch.table} WHERE rowid > ? AND {quote(f)} IS NOT NULL",
                                  (index.indexed_through(db),)))
                    for f, index in DerivedIndexes(sch).vectors.items()
                },
            }
        last_seq = int(scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='last_seq'), 0)"))
        watermark = int(scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='watermark'), 0)"))
        pending = int(scalar(db, "SELECT count(*) FROM _ls_changes WHERE seq > ?", (watermark,)))
        history = int(scalar(db, "SELECT count(*) FROM _ls_changes WHERE seq <= ?", (watermark,)))
    wal = store.path + "-wal"
    return StoreStats(
        path=store.path,
        store_id=store.id,
        file_bytes=os.path.getsize(store.path),
        wal_bytes=os.path.getsize(wal) if os.path.exists(wal) else 0,
        collections=per,
        last_seq=last_seq,
        watermark=watermark,
        pending_changes=pending,
        history_changes=history,
    )


__all__ = ["StoreStats", "VerifyReport", "backup", "expire", "optimize", "stats", "translate", "verify"]
