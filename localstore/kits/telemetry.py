"""Telemetry and checkpoints kit: sessions, per-step records, emergencies, checkpoints, basin history.

    import localstore as ls
    from localstore.kits.telemetry import Telemetry

    tm = Telemetry(ls.open("data/kernel-7.db"))
    sid = tm.start_session()
    tm.record_telemetry_many(sid, [{"step": i, "phi": 0.7, "kappa_eff": 63.9} for i in range(100_000)])
    tm.record_emergency(sid, reason="phi collapse", severity="critical", metric="phi", value=0.1, threshold=0.3)
    tm.end_session(sid)                       # computes total_steps, avg_phi, max_phi, emergency_count
    tm.save_checkpoint(sid, phi=0.82, kappa=64.1, regime="geometric", basin_coords=p, state_dict={"w": w})
    tm.save_checkpoints(sid, [{"phi": 0.8, "state_dict": s1}, {"phi": 0.9, "state_dict": s2}])  # one transaction
    tm.get_best_checkpoint(); tm.list_checkpoints(sid); tm.prune_checkpoints(keep=5)
    tm.latest_telemetry(); tm.best_checkpoints(); tm.emergency_summary(); tm.session_stats()
    tm.delete_telemetry_older_than(days=30)

Collections (names as the systems they replace use them): ``telemetry_sessions``,
``telemetry_records``, ``emergency_events``, ``checkpoints``, ``checkpoint_states``,
``checkpoint_history``, ``basin_history``. Timestamps are Unix seconds (UTC).

Checkpoints. A save writes the small ``checkpoints`` row, the state in
``checkpoint_states`` (once; never rewritten) and a "created" history entry, and
touches no other checkpoint but the previous best, whose ``is_best`` flag is cleared
by a partial update. A checkpoint's rank in its session (1 = highest phi, ties to
the older) is computed when read (``ranks``, ``list_checkpoints``, ``load_checkpoint``),
so saving costs the same at the thousandth checkpoint of a session as at the first.
Stores written by earlier versions keep their states in ``checkpoints.state_dict``
and are read as before. A process that saves large states often should open its
store with ``ls.open(path, wal_checkpoint="background")``: SQLite's WAL checkpoints
(copying each state a second time, into the database file, and syncing it) then run
in a thread instead of inside every ~70th save, with the same durability.

Keys. A telemetry record's key is ``"<session_id>#<step, 12 digits>"`` (basin
history likewise), so re-recording a step replaces it, a session's records are one
range of the key index, and "the latest record of a session" is one index probe.
Session ids therefore cannot contain ``#``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

import localstore as ls

from ._util import finite, new_id, now, to_epoch
from .checkpoint_state import decode_state, encode_state
from .checkpoints import Checkpoints

# decode_state/encode_state: the state layout is part of this kit's public surface.
__all__ = ["Telemetry", "check_session_id", "decode_state", "encode_state", "record_key"]

STATUSES = ("running", "completed", "failed", "aborted", "imported")
HISTORY_ACTIONS = ("created", "loaded", "pruned", "ranked")
BASIN_DIM = 64
BASIN_METRICS = ("fisher_rao", "cosine")
DEFAULT_BASIN_METRIC = "fisher_rao"
#: Step numbers are zero-padded to this many digits in record keys.
STEP_DIGITS = 12
MAX_STEP = 10**STEP_DIGITS - 1
#: Records read per page when a session's records are scanned (``end_session``, stats).
DEFAULT_PAGE = 20_000
_RECORD_KEYS = frozenset({"session_id", "step", "timestamp", "phi", "kappa_eff", "regime", "basin_distance", "emergency"})
# A float strictly between these is finite (NaN fails every comparison).
_FINITE_MIN, _FINITE_MAX = float("-inf"), float("inf")


def record_key(session_id: str, step: int) -> str:
    """The key of a session's record (or basin history entry) at ``step``."""
    return f"{session_id}#{step:0{STEP_DIGITS}d}"


def _session_range(session_id: str) -> dict[str, Any]:
    """A where-condition on a record key matching exactly the session's records."""
    return {">=": f"{session_id}#", "<": f"{session_id}$"}  # '$' follows '#' in code point order


def check_session_id(session_id: Any) -> str:
    """Validate a session id: a non-empty string without ``#``."""
    if not isinstance(session_id, str) or not session_id or "#" in session_id:
        raise ls.ValidationError(f"telemetry: a session id must be a non-empty string without '#', got {session_id!r}")
    return session_id


class Telemetry(Checkpoints):
    """The telemetry and checkpoints kit on one store. Declares (or reopens) its collections.

    ``basin_metric`` (``"fisher_rao"`` or ``"cosine"``) ranks the 64-d ``basin_coords``
    of checkpoints and basin history; it is fixed when the collections are first declared
    (None: what the store holds, else ``"fisher_rao"``).
    """

    def __init__(self, store: ls.Store, *, basin_metric: str | None = None) -> None:
        self.store = store
        if "checkpoints" in store:
            stored = store.collection("checkpoints").fields["basin_coords"].metric  # type: ignore[attr-defined]
            if basin_metric is not None and basin_metric != stored:
                raise ls.SchemaError(
                    f"{store.path}: checkpoints.basin_coords was declared with metric={stored!r}, not "
                    f"{basin_metric!r}; pass basin_metric={stored!r} or use another store"
                )
            basin_metric = stored
        basin_metric = DEFAULT_BASIN_METRIC if basin_metric is None else basin_metric
        if basin_metric not in BASIN_METRICS:
            raise ls.SchemaError(f"telemetry: basin_metric must be one of {BASIN_METRICS}, got {basin_metric!r}")
        self.sessions = store.collection("telemetry_sessions", key="session_id", fields={
            "session_id": ls.Text(),
            "started_at": ls.Real(index=True),
            "ended_at": ls.Real(),
            "status": ls.Text(index=True, default="running"),
            "total_steps": ls.Integer(default=0),
            "avg_phi": ls.Real(),
            "max_phi": ls.Real(),
            "emergency_count": ls.Integer(default=0),
            "metadata": ls.Json(default={}),
        })
        self.records = store.collection("telemetry_records", key="record_id", fields={
            "record_id": ls.Text(),                  # "<session_id>#<step>", see the module docstring
            "session_id": ls.Text(),                 # found through the key range, so no second index
            "step": ls.Integer(),
            "timestamp": ls.Real(index=True),        # retention deletes by it
            "phi": ls.Real(),
            "kappa_eff": ls.Real(),
            "regime": ls.Text(),
            "basin_distance": ls.Real(),
            "emergency": ls.Boolean(default=False),
        })
        self.emergencies = store.collection("emergency_events", key="event_id", fields={
            "event_id": ls.Text(),
            "session_id": ls.Text(index=True),
            "timestamp": ls.Real(index=True),
            "reason": ls.Text(),
            "severity": ls.Text(index=True),
            "metric": ls.Text(),
            "value": ls.Real(),
            "threshold": ls.Real(),
            "step": ls.Integer(),                    # an addition: the step it happened at, when known
        })
        self.checkpoints = store.collection("checkpoints", key="checkpoint_id", fields={
            "checkpoint_id": ls.Text(),
            "session_id": ls.Text(filter=True),
            "created_at": ls.Real(index=True),
            "phi": ls.Real(filter=True),
            "kappa": ls.Real(),
            "regime": ls.Text(filter=True),
            "basin_coords": ls.Vector(BASIN_DIM, metric=basin_metric),
            "state_dict": ls.Blob(compress=True),    # earlier versions' states; new ones are in checkpoint_states
            "metadata": ls.Json(default={}),
            "rank": ls.Integer(),                    # no longer stored (see ranks()); kept for earlier stores
            "is_best": ls.Boolean(filter=True, default=False),  # the session's top checkpoint, kept current
        })
        # A state is written once and never rewritten, so the small checkpoint rows can change
        # (is_best) without copying it. The kit compresses its JSON part (see encode_state).
        self.states = store.collection("checkpoint_states", key="checkpoint_id", fields={
            "checkpoint_id": ls.Text(),
            "session_id": ls.Text(),
            "state": ls.Blob(),
        })
        self._meta = [n for n in self.checkpoints.fields if n != "state_dict"]
        self.history = store.collection("checkpoint_history", key="history_id", fields={
            "history_id": ls.Text(),
            "checkpoint_id": ls.Text(index=True),
            "session_id": ls.Text(),
            "action": ls.Text(index=True),           # created, loaded, pruned, ranked
            "timestamp": ls.Real(index=True),
            "details": ls.Json(default={}),
        })
        self.basins = store.collection("basin_history", key="entry_id", fields={
            "entry_id": ls.Text(),                   # "<session_id>#<step>"
            "session_id": ls.Text(),
            "step": ls.Integer(),
            "timestamp": ls.Real(index=True),
            "basin_coords": ls.Vector(BASIN_DIM, metric=basin_metric),
            "phi": ls.Real(),
            "kappa": ls.Real(),
            "regime": ls.Text(),
        })

    # -- sessions -----------------------------------------------------------------------------

    def start_session(
        self, session_id: str | None = None, *, started_at: Any = None, metadata: dict[str, Any] | None = None,
        status: str = "running",
    ) -> str:
        """Create a session row; return its id (generated unless given). An existing id raises."""
        sid = check_session_id(new_id() if session_id is None else session_id)
        if status not in STATUSES:
            raise ls.ValidationError(f"telemetry_sessions[{sid!r}].status: expected one of {STATUSES}, got {status!r}")
        with self.store._all_or_nothing():
            if self.sessions.get(sid) is not None:
                raise ls.ValidationError(f"{self.store.path}: telemetry session {sid!r} already exists")
            self.sessions.put({
                "session_id": sid, "status": status, "metadata": metadata or {},
                "started_at": now() if started_at is None else to_epoch(started_at, f"session {sid!r} started_at"),
            })
        return sid

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session row, or None."""
        return self.sessions.get(session_id)

    def _check_session(self, session_id: Any) -> None:
        """Raise the usual error unless the session exists (one key probe, no row read)."""
        if self.sessions.get(check_session_id(session_id), fields=[]) is None:
            self._require_session(session_id)

    def _require_session(self, session_id: Any) -> dict[str, Any]:
        row = self.sessions.get(check_session_id(session_id))
        if row is None:
            raise ls.ValidationError(f"{self.store.path}: no telemetry session {session_id!r}; start_session it first")
        return row

    def compute_session_stats(self, session_id: str) -> dict[str, Any]:
        """The session's stats from its records and events: total_steps, avg_phi, max_phi, emergency_count.

        total_steps counts the records; avg_phi and max_phi skip records without phi
        (None when there is none); emergency_count counts the emergency events.
        """
        n, n_phi, total, top = 0, 0, 0.0, None
        for page in self._record_pages(session_id):
            n += len(page)
            phis = [r["phi"] for r in page if r["phi"] is not None]
            if phis:
                n_phi += len(phis)
                total += float(np.sum(phis))
                top = max(phis) if top is None else max(top, max(phis))
        return {
            "total_steps": n, "avg_phi": total / n_phi if n_phi else None, "max_phi": top,
            "emergency_count": self.emergencies.count({"session_id": session_id}),
        }

    def refresh_session_stats(self, session_id: str) -> dict[str, Any]:
        """Recompute and store the session's stats without changing its status; return the row.

        Writes nothing when the stats are unchanged.
        """
        with self.store._all_or_nothing():
            row = self._require_session(session_id)
            stats = self.compute_session_stats(session_id)
            if any(row[k] != v for k, v in stats.items()):
                row.update(stats)
                self.sessions.put(row)
        return row

    def end_session(self, session_id: str, *, status: str = "completed", ended_at: Any = None) -> dict[str, Any]:
        """Close a session: set status and ended_at, compute and store its stats; return the row."""
        if status not in STATUSES:
            raise ls.ValidationError(f"telemetry_sessions[{session_id!r}].status: expected one of {STATUSES}, got {status!r}")
        with self.store._all_or_nothing():
            row = self._require_session(session_id)
            row.update(self.compute_session_stats(session_id))
            row["status"] = status
            row["ended_at"] = now() if ended_at is None else to_epoch(ended_at, f"session {session_id!r} ended_at")
            self.sessions.put(row)
        return row

    # -- records --------------------------------------------------------------------------------

    def make_record(self, session_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one telemetry record and return the row to store (without writing it).

        ``record`` holds step (an int >= 0) and optionally timestamp (default now), phi,
        kappa_eff, regime, basin_distance and emergency; a session_id in it must match.
        """
        if not isinstance(record, Mapping):
            raise ls.ValidationError(f"telemetry_records: a record must be a dict, got {type(record).__name__}")
        if not _RECORD_KEYS.issuperset(record):
            unknown = sorted(set(record) - _RECORD_KEYS)
            raise ls.ValidationError(f"telemetry_records: unknown field(s) {', '.join(unknown)}")
        get = record.get
        if get("session_id", session_id) != session_id:
            raise ls.ValidationError(
                f"telemetry_records: record of session {record['session_id']!r} given for session {session_id!r}"
            )
        step = get("step")
        if type(step) is not int:  # the common case skips the general checks
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise ls.ValidationError(f"telemetry_records: step must be an int in 0..{MAX_STEP}, got {step!r}")
            step = int(step)
        if not 0 <= step <= MAX_STEP:
            raise ls.ValidationError(f"telemetry_records: step must be an int in 0..{MAX_STEP}, got {step!r}")
        ts = get("timestamp")
        emergency = get("emergency", False)
        regime = get("regime")
        row: dict[str, Any] = {
            "record_id": f"{session_id}#{step:0{STEP_DIGITS}d}", "session_id": session_id, "step": step,
            "timestamp": ts,
            "phi": get("phi"), "kappa_eff": get("kappa_eff"), "regime": regime, "basin_distance": get("basin_distance"),
            "emergency": emergency,
        }
        if type(emergency) is not bool:
            if not isinstance(emergency, np.bool_):
                raise ls.ValidationError(
                    f"telemetry_records[{session_id!r}, step {step}].emergency: expected true or false, got {emergency!r}"
                )
            row["emergency"] = bool(emergency)
        if regime is not None and type(regime) is not str:
            raise ls.ValidationError(f"telemetry_records[{session_id!r}, step {step}].regime: expected text, got {regime!r}")
        if type(ts) is not float or not _FINITE_MIN < ts < _FINITE_MAX:
            where = f"telemetry_records[{session_id!r}, step {step}].timestamp"
            row["timestamp"] = now() if ts is None else to_epoch(ts, where)
        for name in ("phi", "kappa_eff", "basin_distance"):
            value = row[name]
            if value is not None and (type(value) is not float or not _FINITE_MIN < value < _FINITE_MAX):
                row[name] = finite(value, f"telemetry_records[{session_id!r}, step {step}].{name}")
        return row

    def record_telemetry(self, session_id: str, step: int, **fields: Any) -> str:
        """Record one step of a session (phi=, kappa_eff=, regime=, ...); return the record's key."""
        self._require_session(session_id)
        row = self.make_record(session_id, {**fields, "step": step})
        self.records.put(row)
        return str(row["record_id"])

    def record_telemetry_many(self, session_id: str, records: Iterable[Mapping[str, Any]]) -> int:
        """Record many steps in one transaction (all or none); return the count. The fast path."""
        self._require_session(session_id)
        rows = [self.make_record(session_id, r) for r in records]
        return self.records.put_many(rows)

    def _record_pages(self, session_id: str, page: int = DEFAULT_PAGE) -> Iterator[list[dict[str, Any]]]:
        """A session's records in step order, a page at a time (bounded memory)."""
        after = f"{session_id}#"
        while True:
            rows = self.records.find(
                where={"record_id": {">": after, "<": f"{session_id}$"}}, order_by="record_id", limit=page
            )
            if not rows:
                return
            yield rows
            after = rows[-1]["record_id"]

    def session_records(self, session_id: str) -> list[dict[str, Any]]:
        """All records of a session in step order."""
        return [r for page in self._record_pages(session_id) for r in page]

    def count_records(self, session_id: str) -> int:
        """How many records a session has."""
        return self.records.count({"record_id": _session_range(check_session_id(session_id))})

    def latest_record(self, session_id: str) -> dict[str, Any] | None:
        """The record with the highest step of a session, or None."""
        rows = self.records.find(where={"record_id": _session_range(check_session_id(session_id))},
                                 order_by="-record_id", limit=1)
        return rows[0] if rows else None

    # -- emergencies ----------------------------------------------------------------------------

    def record_emergency(
        self, session_id: str, *, reason: str, severity: str = "warning", metric: str | None = None,
        value: float | None = None, threshold: float | None = None, timestamp: Any = None,
        step: int | None = None, event_id: str | None = None,
    ) -> str:
        """Record an emergency event of a session; return its id (generated unless given)."""
        self._require_session(session_id)
        row = self.make_emergency(session_id, {
            "reason": reason, "severity": severity, "metric": metric, "value": value, "threshold": threshold,
            "timestamp": timestamp, "step": step, "event_id": event_id,
        })
        self.emergencies.put(row)
        return str(row["event_id"])

    def make_emergency(self, session_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one emergency event and return the row to store (without writing it)."""
        eid = event.get("event_id") or new_id()
        where = f"emergency_events[{eid!r}]"
        if not isinstance(eid, str):
            raise ls.ValidationError(f"{where}: event_id must be text")
        for name in ("reason", "severity"):
            if not isinstance(event.get(name), str) or not event[name]:
                raise ls.ValidationError(f"{where}.{name}: expected a non-empty string, got {event.get(name)!r}")
        if event.get("metric") is not None and not isinstance(event["metric"], str):
            raise ls.ValidationError(f"{where}.metric: expected text, got {event['metric']!r}")
        step = event.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ls.ValidationError(f"{where}.step: expected an int >= 0, got {step!r}")
        return {
            "event_id": eid, "session_id": session_id, "reason": event["reason"], "severity": event["severity"],
            "metric": event.get("metric"), "step": step,
            "timestamp": now() if event.get("timestamp") is None else to_epoch(event["timestamp"], f"{where}.timestamp"),
            **{k: None if event.get(k) is None else finite(event[k], f"{where}.{k}") for k in ("value", "threshold")},
        }

    def emergency_summary(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Per session: count, counts by severity and by metric, first_at and last_at (sessions with events)."""
        where = None if session_id is None else {"session_id": session_id}
        summary: dict[str, dict[str, Any]] = {}
        for e in self.emergencies.find(where=where, order_by="timestamp"):
            s = summary.setdefault(e["session_id"], {
                "session_id": e["session_id"], "count": 0, "by_severity": {}, "by_metric": {},
                "first_at": e["timestamp"], "last_at": e["timestamp"],
            })
            s["count"] += 1
            s["by_severity"][e["severity"]] = s["by_severity"].get(e["severity"], 0) + 1
            metric = e["metric"] or "unknown"
            s["by_metric"][metric] = s["by_metric"].get(metric, 0) + 1
            s["last_at"] = e["timestamp"]
        return sorted(summary.values(), key=lambda s: s["session_id"])

    # -- basin history --------------------------------------------------------------------------

    def record_basin(
        self, session_id: str, step: int, basin_coords: Any, *, phi: float | None = None,
        kappa: float | None = None, regime: str | None = None, timestamp: Any = None,
    ) -> str:
        """Record the basin of a session at a step (re-recording a step replaces it); return the key."""
        check_session_id(session_id)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise ls.ValidationError(f"basin_history: step must be an int in 0..{MAX_STEP}, got {step!r}")
        key = record_key(session_id, step)
        self.basins.put({
            "entry_id": key, "session_id": session_id, "step": step, "basin_coords": basin_coords,
            "phi": None if phi is None else finite(phi, f"basin_history[{key!r}].phi"),
            "kappa": None if kappa is None else finite(kappa, f"basin_history[{key!r}].kappa"), "regime": regime,
            "timestamp": now() if timestamp is None else to_epoch(timestamp, f"basin_history[{key!r}].timestamp"),
        })
        return key

    def basin_trajectory(self, session_id: str) -> list[dict[str, Any]]:
        """A session's basin history in step order."""
        return self.basins.find(where={"entry_id": _session_range(check_session_id(session_id))}, order_by="entry_id")

    # -- queries --------------------------------------------------------------------------------

    def latest_telemetry(self) -> dict[str, dict[str, Any]]:
        """The latest record (highest step) of every session that has one, by session id."""
        out = {}
        for sid in self.sessions.keys():  # noqa: SIM118 (a Collection, not a dict)
            row = self.latest_record(sid)
            if row is not None:
                out[sid] = row
        return out

    def session_stats(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Session rows plus checkpoint_count and best_phi, by session id.

        The stored stats are those of the last ``end_session``/``refresh_session_stats``.
        """
        sessions = self.sessions.find(where=None if session_id is None else {"session_id": session_id},
                                      order_by="session_id")
        for s in sessions:
            s["checkpoint_count"] = self.checkpoints.count({"session_id": s["session_id"]})
            best = self.checkpoints.find({"session_id": s["session_id"]}, fields=["phi"], order_by="-phi", limit=1)
            s["best_phi"] = best[0]["phi"] if best else None
        return sessions

    def delete_telemetry_older_than(
        self, days: float, *, now_ts: Any = None, batch: int = 10_000
    ) -> dict[str, int]:
        """Retention: delete telemetry records and basin history older than ``days``; return counts.

        Sessions, emergency events and checkpoints are kept. Deletes run in batches of
        ``batch`` rows, one transaction each, and are logged, so they sync.
        """
        cutoff = (now() if now_ts is None else to_epoch(now_ts, "retention now_ts")) - finite(days, "days", low=0.0) * 86_400
        counts = {}
        for coll in (self.records, self.basins):
            n = 0
            while keys := coll.keys(where={"timestamp": {"<": cutoff}}, limit=batch):
                n += coll.delete_many(keys)
            counts[coll.name] = n
        return counts
