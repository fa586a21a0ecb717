"""A background WAL checkpointer: copies committed pages into the database file off the writer's path.

By default SQLite checkpoints inside the commit that takes the WAL past 1,000 pages
(``wal_autocheckpoint``): that commit copies ~4 MB into the database file and waits
for two fsyncs, so a writer of large rows pays most of its time there. A store
opened with ``wal_checkpoint="background"`` runs no checkpoint in its commits; its
WAL hook wakes a thread that checkpoints on a connection of its own, while the
writer carries on.

Durability is unchanged. A commit is complete once its frames are in the WAL,
whoever checkpoints later (``durability="normal"``: it survives a process crash;
``"full"``: power loss too), and a checkpoint only moves pages already committed,
crash-safely, with the same syncs as SQLite's own (the thread's connection has the
store's ``synchronous`` setting).

The bound. A PASSIVE checkpoint never blocks anyone, but beside a busy writer it
never quite catches up, and SQLite rewinds the WAL only when a write begins after a
checkpoint has copied all of it. So once the WAL passes ``DEFAULT_WAL_MAX_PAGES``,
the writer itself, right after its commit, waits for the thread's pass in progress
and runs one more: it copies only the few pages committed since, and its next write
starts the WAL from the beginning. Readers holding an old snapshot can keep that
from happening; the WAL then grows until they move on, as under SQLite's own
checkpoints, and the writer retries after each commit.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

import apsw

from ._sqlite import connect

#: The choices of ``localstore.open(wal_checkpoint=...)``: SQLite's own (in the commit), or a background thread.
WAL_CHECKPOINT_MODES = ("auto", "background")

#: WAL size, in pages, from which each commit wakes the background checkpointer
#: (SQLite's autocheckpoint default). 0 would wake it at every commit.
DEFAULT_WAL_WAKE_PAGES = 1_000

#: WAL size, in pages, past which the writer finishes the checkpoint itself after its
#: commit, so the WAL rewinds (16,384 pages of 4 KiB: 64 MiB; the file is reused, not
#: regrown). Should exceed ``DEFAULT_WAL_WAKE_PAGES``; the larger, the rarer the writer waits.
DEFAULT_WAL_MAX_PAGES = 16_384


class WalCheckpointer:
    """A thread that checkpoints a store's WAL on its own connection, woken by the writer's WAL hook.

    ``install`` sets the writer connection's WAL hook, which replaces SQLite's
    autocheckpoint on that connection; the store calls ``after_commit`` after each
    commit. ``close`` stops the thread and closes its connection; call it before
    closing the writer, so the writer's close is the last one and checkpoints and
    removes the WAL as usual.
    """

    def __init__(
        self, path: str, *, durability: str, vfs: str | None,
        wake_pages: int = DEFAULT_WAL_WAKE_PAGES, max_pages: int = DEFAULT_WAL_MAX_PAGES,
    ) -> None:
        self.path = path
        self.wake_pages, self.max_pages = wake_pages, max_pages
        # Opened here, so a failure shows at open time; used only by the thread from then on.
        self._conn: apsw.Connection | None = connect(path, durability=durability, vfs=vfs)
        try:
            # The WAL is opened lazily: a checkpoint on a connection that has read nothing does nothing.
            self._conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        except BaseException:
            self._conn.close()
            raise
        self._pages = 0
        self._wake = threading.Event()
        # One checkpoint at a time from this process: SQLite refuses a second one (SQLITE_BUSY) rather than wait.
        self._running = threading.Lock()
        self._stop = False
        #: Checkpoints run by the thread (passive), by the writer to rewind the WAL (catch_up),
        #: and refused by SQLite (busy: another process's checkpoint); the last unexpected error.
        self.counts = {"passive": 0, "catch_up": 0, "busy": 0}
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"localstore-wal-checkpoint {path}", daemon=True)
        self._thread.start()

    def install(self, writer: apsw.Connection) -> None:
        """Route the writer's commits to this checkpointer instead of SQLite's autocheckpoint.

        If the writer is dropped without its store being closed, the thread and its
        connection go with it, rather than waiting for a wake-up that cannot come.
        """
        writer.set_wal_hook(self._hook)
        weakref.finalize(writer, self.close)

    def _hook(self, _conn: Any, _dbname: str, pages: int) -> int:
        # Runs inside the writer's COMMIT, which must not be re-entered: only note the size and wake the thread.
        self._pages = pages
        if pages >= self.wake_pages:
            self._wake.set()
        return apsw.SQLITE_OK

    def after_commit(self, writer: apsw.Connection) -> None:
        """Past ``max_pages``, finish the checkpoint on the writer (now outside any transaction), so the WAL rewinds.

        The commit is already durable: a failure here only leaves the WAL longer, so it is
        noted in ``last_error`` rather than raised.
        """
        if self._pages < self.max_pages:
            return
        with self._running:
            self._checkpoint(writer, "catch_up")
        self._pages = 0  # the next commit's hook tells the WAL's real size

    def idle(self) -> contextlib.AbstractContextManager[object]:
        """A block during which the thread starts no checkpoint (one in progress finishes first)."""
        return self._running

    def _checkpoint(self, conn: apsw.Connection, kind: str) -> None:
        try:
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            self.counts[kind] += 1
        except (apsw.BusyError, apsw.LockedError):
            self.counts["busy"] += 1  # retried after a later commit
        except Exception as exc:  # noqa: BLE001 - nothing is lost: the pages stay in the WAL for the next try
            self.last_error = exc

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._running:
                conn = self._conn
                if self._stop or conn is None:
                    return
                self._checkpoint(conn, "passive")

    def close(self) -> None:
        """Stop the thread (after the checkpoint in progress, if any) and close its connection. Safe to call twice."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


__all__ = [
    "DEFAULT_WAL_MAX_PAGES",
    "DEFAULT_WAL_WAKE_PAGES",
    "WAL_CHECKPOINT_MODES",
    "WalCheckpointer",
]
