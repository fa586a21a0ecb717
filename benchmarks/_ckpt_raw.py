"""The telemetry kit's checkpoint save as raw apsw statements: the floor of its storage layout.

``RawSaver.save`` writes what ``Telemetry.save_checkpoint`` writes for a new checkpoint,
on the same store and schema: the checkpoint row (``is_best`` moved from the session's
previous best by an UPDATE, whose trigger keeps the change log whole), its state, its
"created" history entry, one change record each, in one transaction. Rows are encoded
by the collections' own generated row encoders, so the bytes match; what it leaves out
is the collection layer around them (nested blocks, error boundaries, per-call change-log
positions, query planning, the partial-update machinery). The gap between this and the
kit is what any rewrite of that layer could win; the gap between this and SqliteSaver is
what the layout itself costs (three tables, their indexes, the change log, the page
checksums, the state's compression).

A benchmark tool, not an API: it skips the checks the kit makes (a session that exists,
a checkpoint id not saved before), and its rows wait above the vector index's high-water
mark as the kit's new rows do. The store's ``verify()`` after a run confirms the rows and
change log it wrote are consistent.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from localstore import clock
from localstore.kits.telemetry import Telemetry, encode_state
from localstore.store import CHANGE_LOG_POSITION


class RawSaver:
    """Save new checkpoints of existing sessions with hand-written statements (see the module docstring)."""

    def __init__(self, tm: Telemetry) -> None:
        self.tm = tm
        self.db = tm.store._db
        ck, st, hi = tm.checkpoints, tm.states, tm.history
        self.encode = (ck._encode_logged, st._encode_logged, hi._encode_logged)
        self.insert = (ck._sql_insert_logged, st._sql_insert_logged, hi._sql_insert_logged)
        self.unflag = (f'UPDATE {ck._schema.table} SET "is_best" = 0, _ls_seq = ?, _ls_hlc = ? WHERE "checkpoint_id" = ?; '
                       f"INSERT INTO _ls_changes(seq, hlc, coll, key, op) VALUES(?, ?, {ck._schema.id}, ?, 1)")
        self.holders = f'SELECT "checkpoint_id", "phi", "created_at" FROM {ck._schema.table} WHERE "session_id" = ? AND "is_best" = 1'
        self.wal = tm.store._wal
        # Rows above a vec0 index's high-water mark wait for its next catch-up, as the kit's fresh rows
        # do; a mark is set here if none is yet, so the rows written below are indexed when next read.
        with tm.store.transaction():
            for index in ck._derived.vectors.values():
                if index.high_water(self.db) is None:
                    index.set_high_water(self.db, int(self.db.execute(f"SELECT coalesce(max(rowid), 0) FROM {ck._schema.table}").fetchone()[0]))

    def save(self, session_id: str, phi: float, state: dict[str, Any]) -> str:
        """Save one new checkpoint of ``session_id`` (kappa 64, regime "geometric", as the benchmark's kit calls)."""
        blob = encode_state(state)
        cid, now = uuid.uuid4().hex, time.time()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, last, floor = db.execute(CHANGE_LOG_POSITION).fetchone()  # as Store._allocate reads it
            seq, hlc = int(seq or 0), clock.next_hlc(max(int(last or 0), int(floor or 0)))
            holders = db.execute(self.holders, (session_id,)).fetchall()
            best = all(phi > h[1] or (phi == h[1] and now < h[2]) for h in holders)
            row = {"checkpoint_id": cid, "session_id": session_id, "phi": phi, "kappa": 64.0, "regime": "geometric",
                   "basin_coords": None, "metadata": {}, "created_at": now, "is_best": best}
            seq, hlc = seq + 1, hlc + 1
            db.execute(self.insert[0], self.encode[0](row, seq, hlc))
            for old in holders if best else ():
                seq, hlc = seq + 1, hlc + 1
                db.execute(self.unflag, (seq, hlc, old[0], seq, hlc, old[0]))
            seq, hlc = seq + 1, hlc + 1
            db.execute(self.insert[1], self.encode[1]({"checkpoint_id": cid, "session_id": session_id, "state": blob},
                                                      seq, hlc))
            seq, hlc = seq + 1, hlc + 1
            entry = {"history_id": uuid.uuid4().hex, "checkpoint_id": cid, "session_id": session_id,
                     "action": "created", "timestamp": now, "details": {"phi": phi}}
            db.execute(self.insert[2], self.encode[2](entry, seq, hlc))
            db.execute("UPDATE _ls_meta SET value = ? WHERE key = 'last_seq'", (seq,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self.wal is not None:
            self.wal.after_commit(db)
        return cid
