"""The change log: what the sync engine reads, acknowledges and prunes.

Every write through the API appends one record per row in the same SQLite
transaction: the per-store ``seq`` (strictly increasing), an HLC timestamp, the
collection, the key, the operation, and the row as stored. Reads of the log run
in one read transaction, so a batch is a consistent snapshot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import apsw
import msgpack

from ._sqlite import boundary, quote, scalar
from .collection import OP_NAMES, OP_PUT
from .errors import ChangeLogError

if TYPE_CHECKING:
    from .store import Store

#: Most changes returned by one ``changes()`` call. 0 is not allowed.
DEFAULT_BATCH_ROWS = 5_000

#: Soft cap on the payload bytes of one batch; a batch always holds at least one change.
DEFAULT_BATCH_BYTES = 8 * 1024 * 1024

#: Acknowledged changes kept by ``prune()`` as local history. 0 keeps none.
DEFAULT_KEEP_HISTORY = 10_000


@dataclass(frozen=True)
class Change:
    """One record of the change log.

    ``payload`` maps each field to its value as stored (encoded: JSON as text,
    arrays and vectors as bytes); ``Collection.decode_payload`` turns it back into
    Python values. It is None for deletes.
    """

    seq: int
    hlc: int
    collection: str
    key: Any
    op: str
    payload: dict[str, Any] | None
    size: int = 0


class StoredChange(NamedTuple):
    """One record of the change log as stored, for shipping: nothing decoded.

    ``packed`` is the row as stored, a msgpack map of field to stored value (what
    ``Change.payload`` decodes from), byte for byte; None for deletes. ``values``
    is set when the record was read from the row itself (the key's latest write):
    the stored values in the collection's field order (key first), so a shipper
    can fill columns without decoding ``packed``. ``size`` is ``len(packed)``.
    """

    seq: int
    hlc: int
    collection: str
    key: Any
    op: str
    packed: bytes | None
    values: tuple[Any, ...] | None
    size: int


class ChangeLog:
    """A store's change log API: read after a seq, acknowledge, prune. Get it as ``store.changelog``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def store_id(self) -> str:
        """The id of the store the log belongs to."""
        return self.store.id

    def last_seq(self) -> int:
        """The highest seq ever written (0 if none); pruning does not lower it."""
        tx = self.store._tx
        if tx is not None and tx.last_seq is not None:
            return tx.last_seq  # this transaction's writes are not in _ls_meta until it commits
        return int(self.store._run(
            lambda db: scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='last_seq'), 0)"),
            "reading the change log",
        ))

    def watermark(self) -> int:
        """The highest seq that the central store has acknowledged (0 if none)."""
        return int(self.store._run(
            lambda db: scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='watermark'), 0)"),
            "reading the watermark",
        ))

    def pending(self) -> int:
        """The number of changes not yet acknowledged."""
        return int(self.store._run(
            lambda db: scalar(db, 
                "SELECT count(*) FROM _ls_changes WHERE seq > coalesce((SELECT value FROM _ls_meta WHERE key='watermark'), 0)"
            ),
            "counting pending changes",
        ))

    def changes(
        self,
        after: int = 0,
        *,
        limit: int = DEFAULT_BATCH_ROWS,
        max_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> list[Change]:
        """Changes with seq greater than ``after``, in seq order, bounded by ``limit`` rows and ``max_bytes``."""
        orders: dict[str, tuple[str, ...]] = {}
        out = []
        for r in self.stored_changes(after, limit=limit, max_bytes=max_bytes):
            payload = None
            if r.packed is not None:
                if r.values is not None:
                    # Read from its table in this very call: its values are at hand, in field order.
                    order = orders.get(r.collection)
                    if order is None:
                        order = orders[r.collection] = self.store.collection(r.collection)._order
                    payload = dict(zip(order, r.values))
                else:
                    payload = msgpack.unpackb(r.packed, raw=False)
            out.append(Change(r.seq, r.hlc, r.collection, r.key, r.op, payload, r.size))
        return out

    def stored_changes(
        self,
        after: int = 0,
        *,
        limit: int = DEFAULT_BATCH_ROWS,
        max_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> list[StoredChange]:
        """Like ``changes`` but nothing decoded: payloads as stored bytes (what the sync engine ships).

        Read in one read transaction, so the batch is a consistent snapshot.
        """
        if not isinstance(after, int) or after < 0:
            raise ChangeLogError(f"after must be a non-negative int, got {after!r}")
        if not isinstance(limit, int) or limit < 1:
            raise ChangeLogError(f"limit must be a positive int, got {limit!r}")
        store = self.store

        def read(db: Any) -> list[StoredChange]:
            if store.in_transaction:
                return self._read_batch(db, after, limit, max_bytes)
            db.execute("BEGIN")
            try:
                batch = self._read_batch(db, after, limit, max_bytes)
            except BaseException:
                # SQLite may have ended the transaction itself (a page failing its checksum
                # does): a COMMIT here would fail and hide the error that matters.
                if not db.getautocommit():
                    with contextlib.suppress(apsw.Error):
                        db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return batch

        result: list[StoredChange] = store._run(read, "reading the change log")
        return result

    def iter_changes(self, after: int = 0, *, batch: int = DEFAULT_BATCH_ROWS) -> Iterator[Change]:
        """Every change with seq greater than ``after``, read in batches of ``batch`` (each one snapshot)."""
        while True:
            chunk = self.changes(after, limit=batch)
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].seq

    def _read_batch(self, db: Any, after: int, limit: int, max_bytes: int) -> list[StoredChange]:
        names = {cid: name for cid, name in db.execute("SELECT id, name FROM _ls_collections")}
        records = db.execute(
            "SELECT seq, hlc, coll, key, op, payload, length(payload) FROM _ls_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        # Records still by reference (payload NULL) are the key's latest write: the row as
        # currently stored is their payload. Their rows are read by one join on the key index
        # per collection, in seq order, and packed here in one msgpack call per row (a SQL
        # function per row is several times slower).
        by_ref = {coll for _seq, _hlc, coll, _key, op, payload, _n in records if payload is None and op == OP_PUT}
        rows_of: dict[int, Iterator[tuple[Any, ...]]] = {}
        orders: dict[int, tuple[str, ...]] = {}
        for coll in by_ref:
            collection = self.store.collection(names[coll])
            orders[coll] = collection._order
            cols = ", ".join(f"t.{_q(n)}" for n in collection._order)
            sql = (
                f"SELECT t._ls_seq, {cols} FROM _ls_changes ch JOIN {collection._schema.table} t "
                f"ON t.{_q(collection.key)} = ch.key WHERE ch.seq BETWEEN ? AND ? AND ch.coll = ? "
                f"AND ch.op = {OP_PUT} AND ch.payload IS NULL ORDER BY ch.seq"
            )
            rows_of[coll] = iter(db.execute(sql, (records[0][0], records[-1][0], coll)).fetchall())
        pack = msgpack.Packer(use_bin_type=True).pack
        out: list[StoredChange] = []
        total = 0
        for seq, hlc, coll, key, op, payload, size in records:
            values = None
            if payload is None:
                if op == OP_PUT:
                    # The join yields the rows in the records' order: each must carry its record's seq.
                    row = next(rows_of[coll], None)
                    if row is None or row[0] != seq:
                        raise ChangeLogError(
                            f"store {self.store.path}: change {seq} ({names.get(coll)!r}, key {key!r}) refers to a "
                            "row that no longer holds it; the file was changed outside localstore. Run store.verify()"
                        )
                    values = row[1:]
                    payload = pack(dict(zip(orders[coll], values)))
                    size = len(payload)
                else:
                    size = 0
            elif op != OP_PUT:
                payload = None
            if out and total + size > max_bytes:
                break
            total += size
            out.append(StoredChange(seq, hlc, names.get(coll) or f"#{coll}", key, OP_NAMES.get(op) or str(op),
                                    payload, values, size))
        return out

    def ack(self, seq: int) -> int:
        """Record that the central store has committed every change up to ``seq``; return the watermark.

        The watermark never moves backwards: acknowledging an older seq is a no-op.
        """
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ChangeLogError(f"ack takes a non-negative int seq, got {seq!r}")
        store = self.store
        with store.transaction(), boundary(store.path, "acknowledging changes"):
            db = store._db
            tx = store._tx
            if tx is not None and tx.last_seq is not None:
                last = tx.last_seq  # writes earlier in this transaction are not in _ls_meta yet
            else:
                last = scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='last_seq'), 0)")
            if seq > last:
                raise ChangeLogError(f"store {store.path}: cannot acknowledge seq {seq}; the last seq written is {last}")
            db.execute(
                "INSERT INTO _ls_meta(key, value) VALUES('watermark', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                (seq,),
            )
            return int(scalar(db, "SELECT value FROM _ls_meta WHERE key='watermark'"))

    def prune(self, keep: int = DEFAULT_KEEP_HISTORY) -> int:
        """Delete acknowledged changes, keeping the newest ``keep`` of them as history; return the count deleted."""
        if not isinstance(keep, int) or keep < 0:
            raise ChangeLogError(f"keep must be a non-negative int, got {keep!r}")
        store = self.store
        with store.transaction(), boundary(store.path, "pruning the change log"):
            db = store._db
            watermark = int(scalar(db, "SELECT coalesce((SELECT value FROM _ls_meta WHERE key='watermark'), 0)"))
            cutoff = watermark - keep
            if cutoff <= 0:
                return 0
            floor = scalar(db, "SELECT max(hlc) FROM _ls_changes WHERE seq <= ?", (cutoff,))
            if floor is None:
                return 0
            # Keep the clock's position: the newest pruned HLC becomes a floor for the next write.
            db.execute(
                "INSERT INTO _ls_meta(key, value) VALUES('hlc_floor', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                (floor,),
            )
            db.execute(
                "INSERT INTO _ls_meta(key, value) VALUES('pruned_through', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                (cutoff,),
            )
            db.execute("DELETE FROM _ls_changes WHERE seq <= ?", (cutoff,))
            return int(db.changes())


def _q(name: str) -> str:

    return quote(name)
