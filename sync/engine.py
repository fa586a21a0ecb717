"""The sync engine: a background thread that ships stores' change logs to Postgres when their files change.

``SyncEngine(workspace_or_store, url).start()`` is the one line that turns sync on
in a process; the daemon (``localstore sync daemon``) runs the same engine in the
foreground. File events (watchdog) mark stores due, debounced; the thread sleeps
on a condition until a store is due, so an idle engine uses no CPU. When Postgres
fails, due stores are retried with exponential backoff and jitter; their changes
stay queued in the stores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

from localstore.store import Store
from localstore.workspace import SUFFIX, Workspace

from .batching import (
    DEFAULT_BACKOFF_CAP_S,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_ROWS,
    DEFAULT_DEBOUNCE_MAX_S,
    DEFAULT_DEBOUNCE_S,
    Backoff,
    Debouncer,
)
from .central import DEFAULT_SCHEMA, Central
from .errors import (
    AuthenticationError,
    ConfigError,
    DatabaseMissingError,
    PostgresError,
    SeqConflictError,
    SyncError,
)
from .shipper import PassResult, describe_result, sync_store
from .url import redact, resolve_url

log = logging.getLogger("localstore.sync")

#: Stores kept open by one engine; older ones are closed and reopened when next due.
DEFAULT_OPEN_STORES = 64

#: Worker threads shipping different stores at once, each with its own Postgres connection. 1 is serial.
DEFAULT_WORKERS = 4

#: How long the listener for other stores' changes blocks on its socket between checks for stop, in seconds.
#: It exists only while some store subscribes to a collection.
DEFAULT_LISTEN_WAIT_S = 1.0

#: Errors that no retry can fix: the engine reports them and keeps retrying slowly only in daemon mode.
FATAL = (AuthenticationError, DatabaseMissingError, ConfigError)


class SyncEngine:
    """Ships the change logs of a workspace (or of one store) to Postgres, in a background thread.

    ``url`` defaults to ``LOCALSTORE_POSTGRES_URL``, else ``DATABASE_URL``. The engine
    opens its own connections to the store files, so writers are never blocked by
    its reads; its only write to a store is the watermark, after Postgres commits.
    """

    def __init__(
        self,
        target: Workspace | Store | str | os.PathLike[str],
        url: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        hnsw: bool = False,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        debounce: float = DEFAULT_DEBOUNCE_S,
        pull: bool = True,
        watch: bool = True,
        open_stores: int = DEFAULT_OPEN_STORES,
        backoff_cap: float = DEFAULT_BACKOFF_CAP_S,
        workers: int = DEFAULT_WORKERS,
        pgvector: bool = True,
    ) -> None:
        self.url = resolve_url(url)
        self.shown_url = redact(self.url)
        if isinstance(target, Workspace):
            self.folder, self.only = target.path, None
        elif isinstance(target, Store):
            self.folder, self.only = os.path.dirname(os.path.abspath(target.path)), _name_of(target.path)
        else:
            path = os.fspath(target)
            if os.path.isdir(path):
                self.folder, self.only = path, None
            elif path.endswith(SUFFIX):
                self.folder, self.only = os.path.dirname(os.path.abspath(path)), _name_of(path)
            else:
                raise ConfigError(f"{path} is neither a workspace folder nor a store file (NAME.db)")
        self.folder = os.path.abspath(self.folder)
        if batch_rows < 1 or batch_bytes < 1:
            raise ConfigError("batch_rows and batch_bytes must be positive")
        self.central = Central(self.url, schema, hnsw=hnsw, pgvector=pgvector)
        self.schema, self.hnsw, self.pgvector = schema, hnsw, pgvector
        self.workers = max(1, workers)
        self._local = threading.local()
        self._centrals: list[Central] = []
        self._inflight: set[str] = set()
        self._dirty: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # counters, the open-store cache, the connection list
        self._subscribers: dict[str, set[str]] = {}  # collection (lowercase) -> stores pulling it
        self._listener: threading.Thread | None = None
        self.batch_rows, self.batch_bytes = batch_rows, batch_bytes
        self.pull = pull
        self.watch = watch
        self._debouncer = Debouncer(delay=debounce, max_delay=max(DEFAULT_DEBOUNCE_MAX_S, debounce * 5))
        self._backoff = Backoff(cap=backoff_cap)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._stores: OrderedDict[str, Store] = OrderedDict()
        self._open_limit = max(1, open_stores)
        self._down = False
        self.last_error: SyncError | None = None
        self.shipped = 0
        self.passes = 0
        #: How many times the background thread woke up; it only wakes for file events and retries.
        self.wakeups = 0
        self.after_commit: Callable[[int], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start watching and the background thread; every store is synced once right away. Returns self."""
        if self._thread is not None:
            return self
        self._stopping = False
        if self.watch:
            self._start_observer()
        self.notify_all()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="localstore-sync-worker")
        self._thread = threading.Thread(target=self._loop, name="localstore-sync", daemon=True)
        self._thread.start()
        log.info("sync engine started", extra={"event": "started", "folder": self.folder, "url": self.shown_url})
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: the batch in flight is finished (committed and acknowledged) unless it takes longer than
        ``timeout`` seconds, in which case it is abandoned (rolled back in Postgres; shipped again next time)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            abandon = bool(self._inflight)
        if abandon:
            import psycopg

            for central in list(self._centrals):  # abandon: the open transactions roll back
                conn = central._conn
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):  # best effort: the transaction is abandoned either way
                        conn.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.join(DEFAULT_LISTEN_WAIT_S + 5)
        self._close_stores()
        for central in [self.central, *self._centrals]:
            central.close()
        self._centrals.clear()
        log.info("sync engine stopped", extra={"event": "stopped", "folder": self.folder})

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- events -----------------------------------------------------------------------------

    def notify(self, name: str) -> None:
        """Mark a store as changed; it is synced after the debounce delay."""
        if self.only is not None and name != self.only:
            return
        with self._cond:
            self._debouncer.touch(name, time.monotonic())
            self._cond.notify()

    def notify_all(self) -> None:
        """Mark every store in the folder as changed."""
        for name in self.names():
            self.notify(name)

    def names(self) -> list[str]:
        """The stores this engine feeds."""
        if self.only is not None:
            return [self.only] if os.path.exists(os.path.join(self.folder, self.only + SUFFIX)) else []
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(e[: -len(SUFFIX)] for e in entries if e.endswith(SUFFIX) and not e.startswith("."))

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        engine = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory or event.event_type not in ("created", "modified", "moved", "closed"):
                    return
                path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
                base = os.path.basename(path)
                if base.endswith(SUFFIX + "-wal"):
                    base = base[:-4]
                if base.endswith(SUFFIX) and not base.startswith("."):
                    engine.notify(base[: -len(SUFFIX)])

        os.makedirs(self.folder, exist_ok=True)
        observer = Observer()
        observer.schedule(Handler(), self.folder, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    deadline = self._debouncer.next_deadline()
                    now = time.monotonic()
                    if deadline is not None and deadline <= now:
                        break
                    self._cond.wait(None if deadline is None else deadline - now)
                if self._stopping:
                    return
                self.wakeups += 1
                due = self._debouncer.pop_due(time.monotonic())
                for name in due:
                    if name in self._inflight:
                        self._dirty.add(name)  # synced again when the running pass ends
                        continue
                    self._inflight.add(name)
                    assert self._pool is not None
                    self._pool.submit(self._work, name)

    def _work(self, name: str) -> None:
        try:
            if not self._stopping:
                self._sync_one(name, self._worker_central())
        finally:
            with self._cond:
                self._inflight.discard(name)
                if name in self._dirty:
                    self._dirty.discard(name)
                    self._debouncer.touch(name, time.monotonic())
                self._cond.notify_all()

    def _worker_central(self) -> Central:
        central: Central | None = getattr(self._local, "central", None)
        if central is None:
            central = self._local.central = Central(self.url, self.schema, hnsw=self.hnsw, pgvector=self.pgvector)
            with self._lock:
                self._centrals.append(central)
        return central

    def _sync_one(self, name: str, central: Central) -> PassResult | None:
        try:
            store = self._store(name)
            result = sync_store(
                central, store, batch_rows=self.batch_rows, batch_bytes=self.batch_bytes,
                should_stop=lambda: self._stopping, pull=self.pull, after_commit=self.after_commit,
            )
        except SeqConflictError as exc:
            self.last_error = exc
            log.error(str(exc), extra={"event": "seq_conflict", "store": name})
            return None
        except (PostgresError, SyncError) as exc:
            self.last_error = exc
            with self._lock:
                delay = self._backoff.next_delay()
            if not self._down:
                log.warning("postgres unavailable; changes stay queued in the stores",
                            extra={"event": "postgres_down", "store": name, "error": str(exc),
                                   "retry_in_s": round(delay, 3)})
            self._down = True
            self._retry_all(name, delay)
            return None
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read: report it, keep the others going
            self.last_error = SyncError(f"store {name}: {exc}")
            log.error("store sync failed", extra={"event": "store_error", "store": name, "error": str(exc)})
            self._evict(name)
            with self._cond:
                self._debouncer.schedule(name, time.monotonic() + self._backoff.cap)
            return None
        if self._down:
            log.info("postgres reachable again", extra={"event": "postgres_up"})
            self._down = False
        self._note_subscriptions(name, result.subscriptions)
        with self._lock:
            self._backoff.reset()
            self.passes += 1
            self.shipped += result.shipped
        if result.shipped or result.pulled:
            log.info("synced", extra={"event": "synced", **describe_result(result)})
        return result

    def _note_subscriptions(self, name: str, collections: list[str]) -> None:
        with self._lock:
            for subs in self._subscribers.values():
                subs.discard(name)
            for coll in collections:
                self._subscribers.setdefault(coll.lower(), set()).add(name)
            start = bool(collections) and self._listener is None and self._thread is not None and not self._stopping
            if start:
                self._listener = threading.Thread(target=self._listen, name="localstore-sync-listen", daemon=True)
        if start and self._listener is not None:
            self._listener.start()

    def _listen(self) -> None:
        """Wake the stores that subscribe to a collection when another store ships it (LISTEN/NOTIFY)."""
        import psycopg
        from psycopg import sql

        backoff = Backoff(cap=self._backoff.cap)
        while not self._stopping:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.central.channel)))
                    backoff.reset()
                    with self._lock:  # notifications may have been missed while not listening
                        missed = set().union(*self._subscribers.values()) if self._subscribers else set()
                    for name in missed:
                        self.notify(name)
                    while not self._stopping:
                        for note in conn.notifies(timeout=DEFAULT_LISTEN_WAIT_S):
                            with self._lock:
                                names = set().union(*(self._subscribers.get(c.lower(), set())
                                                      for c in note.payload.split(",")))
                            for name in names:
                                self.notify(name)
                            if self._stopping:
                                break
            except psycopg.Error:
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(backoff.next_delay())

    def _retry_all(self, name: str, delay: float) -> None:
        at = time.monotonic() + delay
        with self._cond:
            self._debouncer.schedule(name, at)

    def _store(self, name: str) -> Store:
        with self._lock:
            store = self._stores.get(name)
            if store is not None and not store.closed:
                self._stores.move_to_end(name)
                return store
        store = Store(os.path.join(self.folder, name + SUFFIX), create=False)
        with self._lock:
            self._stores[name] = store
            self._stores.move_to_end(name)
            for old_name in list(self._stores):
                if len(self._stores) <= self._open_limit:
                    break
                if old_name not in self._inflight:
                    self._stores.pop(old_name).close()
        return store

    def _evict(self, name: str) -> None:
        with self._lock:
            store = self._stores.pop(name, None)
        if store is not None:
            store.close()

    def _close_stores(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), OrderedDict()
        for store in stores:
            store.close()

    # -- synchronous use ----------------------------------------------------------------------

    def sync_now(self, progress: Callable[[int], None] | None = None) -> int:
        """Sync every store once, in the calling thread, until drained; return the changes shipped.

        Raises the first ``SyncError`` (no retries): for one-shot runs and tests.
        """
        names = self.names()
        spare: queue.SimpleQueue[Central] = queue.SimpleQueue()
        for central in self._once_centrals():
            spare.put(central)

        def one(name: str) -> int:
            central = spare.get()  # one connection per concurrent pass, reused across calls
            try:
                result = sync_store(central, self._store(name), batch_rows=self.batch_rows,
                                    batch_bytes=self.batch_bytes, pull=self.pull, progress=progress,
                                    after_commit=self.after_commit)
            finally:
                spare.put(central)
            return result.shipped

        if self.workers == 1 or len(names) < 2:
            total = sum(one(n) for n in names)
        else:
            with ThreadPoolExecutor(min(self.workers, len(names)), thread_name_prefix="localstore-sync-once") as pool:
                total = sum(pool.map(one, names))
        with self._lock:
            self.shipped += total
        return total

    def _once_centrals(self) -> list[Central]:
        with self._lock:
            while len(self._centrals) < self.workers - 1:
                self._centrals.append(Central(self.url, self.schema, hnsw=self.hnsw, pgvector=self.pgvector))
            return [self.central, *self._centrals[: self.workers - 1]]

    def close(self) -> None:
        """Close the stores and the Postgres connections (after ``sync_now`` use)."""
        self._close_stores()
        for central in [self.central, *self._centrals]:
            central.close()
        self._centrals.clear()


def _name_of(path: str | os.PathLike[str]) -> str:
    return os.path.basename(os.fspath(path)).removesuffix(SUFFIX)
