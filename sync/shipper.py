"""One sync pass over one store: positions, batches, Postgres commit, then the watermark.

The order is the whole guarantee: a batch is committed in Postgres before the
store's watermark moves, and the merge is idempotent, so a crash between the two
(or a batch sent twice) ships nothing twice and loses nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from localstore import replica
from localstore.store import Store

from .batching import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_ROWS, Positions, ack_point, plan
from .central import Central, StoreInfo
from .errors import SeqConflictError

log = logging.getLogger("localstore.sync")


@dataclass
class PassResult:
    """What one pass over a store did."""

    store: str
    shipped: int = 0
    batches: int = 0
    pulled: int = 0
    acked_lost: bool = False
    subscriptions: list[str] = field(default_factory=list)


def sync_store(
    central: Central,
    store: Store,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
    pull: bool = True,
    after_commit: Callable[[int], None] | None = None,
) -> PassResult:
    """Ship every pending change of ``store`` (until ``should_stop``), then pull its subscriptions.

    ``after_commit(seq)`` runs after each Postgres commit and before the watermark
    is written; tests use it to crash exactly there.
    """
    result = PassResult(store.name)
    changelog = store.changelog
    info = _register(central, store)
    central_seq = info.position if info.position is not None else central.position(store.id)
    positions = Positions(changelog.last_seq(), changelog.watermark(), central_seq)
    action, at = plan(positions)
    if action == "conflict":
        info.position = None
        raise SeqConflictError(
            f"store {store.path} (id {store.id}): Postgres already holds its changes up to seq {at}, but the file's "
            f"last seq is {positions.last_seq}; this file is an older copy (a backup?) and shipping it would reuse "
            "seqs. Restore the store from Postgres (localstore restore) instead"
        )
    info.position = central_seq
    after = positions.watermark
    if action == "ack":
        # The previous run committed in Postgres but died before writing the watermark.
        log.info("watermark behind Postgres; acknowledging", extra={"event": "ack_recovered", "store": store.name,
                                                                   "seq": at})
        after = changelog.ack(at)
        result.acked_lost = True

    def read(position: int) -> list[Any]:
        # As stored: payload bytes are shipped as they are, never decoded and packed again.
        return changelog.stored_changes(position, limit=batch_rows, max_bytes=batch_bytes)

    # With a backlog, the next batch is read from SQLite while Postgres merges the current one.
    pool: ThreadPoolExecutor | None = None
    try:
        batch = read(after) if positions.last_seq > after else []
        while batch and not should_stop():
            upcoming = None
            if len(batch) >= batch_rows or changelog.last_seq() > batch[-1].seq:
                pool = pool or ThreadPoolExecutor(1, thread_name_prefix="localstore-sync-read")
                upcoming = pool.submit(read, batch[-1].seq)
            if any(ch.collection not in info.plans for ch in batch):
                # Declared after our read of the schemas: register again, then ship.
                info = _register(central, store, force=True)
            central.ship(info, batch)
            seq = ack_point([ch.seq for ch in batch], after)
            if after_commit is not None:
                after_commit(seq)
            after = changelog.ack(seq)
            result.shipped += len(batch)
            result.batches += 1
            if progress is not None:
                progress(len(batch))
            batch = upcoming.result() if upcoming is not None else []
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if pull and not should_stop():
        from .replicate import pull_subscriptions

        subs = replica.subscriptions(store)
        result.subscriptions = sorted(subs)
        if subs:
            result.pulled = pull_subscriptions(central, store, subs)
    return result


def _register(central: Central, store: Store, *, force: bool = False) -> StoreInfo:
    """Register the store (schemas, dictionaries, internal tables) unless nothing changed since last time."""
    fp = replica.fingerprint(store)
    if not force:
        known = central.known(store.id, fp)
        if known is not None:
            return known
    info = central.register(
        store.id, store.name, os.path.dirname(os.path.abspath(store.path)), replica.collection_specs(store),
        replica.local_dictionaries(store), replica.internal_tables(store),
    )
    info.fingerprint = fp
    return info


def lag_seconds(store: Store, now: float) -> float:
    """Seconds since the oldest change not yet acknowledged was written; 0 when nothing is pending."""
    from localstore.clock import hlc_seconds

    pending = store.changelog.changes(store.changelog.watermark(), limit=1)
    return max(0.0, now - hlc_seconds(pending[0].hlc)) if pending else 0.0


def describe_result(r: PassResult) -> dict[str, Any]:
    """A pass result as log fields."""
    return {"store": r.store, "changes": r.shipped, "batches": r.batches, "pulled": r.pulled}
