"""The checkpoint half of the telemetry kit: save, rank, load, prune and log checkpoints.

``Telemetry`` (``localstore.kits.telemetry``) inherits these methods; it declares the
collections they use (``checkpoints``, ``checkpoint_states``, ``checkpoint_history``)
and knows the sessions. See that module's docstring for the storage layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import localstore as ls

from ._util import finite, new_id, now, to_epoch
from .checkpoint_state import decode_state, encode_state

#: The keyword arguments of ``save_checkpoint``, which ``save_checkpoints`` takes per item.
_SAVE_ARGS = frozenset({"phi", "kappa", "regime", "basin_coords", "state_dict", "metadata", "checkpoint_id", "created_at"})
#: The order of checkpoints by merit: highest phi first, ties to the older (then the earlier written).
BEST_ORDER = ("-phi", "created_at")


def _outranks(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether a new checkpoint ranks above an existing one (an exact tie goes to the one written first)."""
    return bool(new["phi"] > old["phi"] or (new["phi"] == old["phi"] and new["created_at"] < old["created_at"]))


class Checkpoints:
    """Checkpoint methods over collections the subclass declares; ranks are computed when read."""

    store: ls.Store
    checkpoints: ls.Collection
    states: ls.Collection
    history: ls.Collection
    #: The checkpoint fields read without the state (all but the earlier versions' ``state_dict``).
    _meta: list[str]

    def _check_session(self, session_id: Any) -> None:
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(
        self, session_id: str, *, phi: float, kappa: float | None = None, regime: str | None = None,
        basin_coords: Any = None, state_dict: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None, checkpoint_id: str | None = None, created_at: Any = None,
    ) -> str:
        """Save a checkpoint and log it as "created"; return its id.

        ``state_dict`` maps names to numpy arrays (kept exactly, no pickle) or JSON values
        (see ``encode_state``); it goes to ``checkpoint_states``, written once. No other
        checkpoint is rewritten: ranks are computed when read, and only the ``is_best``
        flag of the session's previous best changes (one partial update of a small row).
        """
        row, state = self._new_checkpoint(session_id, {
            "phi": phi, "kappa": kappa, "regime": regime, "basin_coords": basin_coords, "state_dict": state_dict,
            "metadata": metadata, "checkpoint_id": checkpoint_id, "created_at": created_at,
        })
        cid = row["checkpoint_id"]
        with self.store._all_or_nothing():
            self._check_session(session_id)
            # A generated id is new; a given one may name a checkpoint saved before.
            previous = None if checkpoint_id is None else self.checkpoints.get(cid, fields=["session_id"])
            if previous is None:
                self._put_new_checkpoints([row])
            else:  # saved again under its id: its session's best may move either way
                self.checkpoints.put(row)
                self._fix_best({session_id, previous["session_id"]})
            if state is not None:
                self.states.put({"checkpoint_id": cid, "session_id": session_id, "state": state})
            elif previous is not None:
                self.states.delete(cid)
            self._log(cid, session_id, "created", {"phi": row["phi"]})
        return str(cid)

    def save_checkpoints(self, session_id: str, checkpoints: Iterable[Mapping[str, Any]]) -> list[str]:
        """Save several checkpoints of one session in one transaction, all or none; return their ids in order.

        Each item holds ``save_checkpoint``'s keyword arguments (``phi`` required). The
        result is that of saving them one by one, in order: ranks, ``is_best`` and one
        "created" history entry each. New checkpoints are written with one statement per
        collection; items that name a checkpoint saved before are saved one by one.
        """
        items = checkpoints if isinstance(checkpoints, (list, tuple)) else list(checkpoints)
        for item in items:
            if not isinstance(item, Mapping):
                raise ls.ValidationError(
                    f"save_checkpoints: each checkpoint is a dict of save_checkpoint's arguments, got {type(item).__name__}"
                )
        built = [self._new_checkpoint(session_id, item) for item in items]  # validated and encoded before the lock
        ids = [row["checkpoint_id"] for row, _ in built]
        if len(set(ids)) != len(ids):
            raise ls.ValidationError(f"save_checkpoints: a checkpoint_id appears twice in one call ({ids!r})")
        given = [i for i, item in zip(ids, items, strict=True) if item.get("checkpoint_id") is not None]
        with self.store._all_or_nothing():
            self._check_session(session_id)
            if not built:
                return ids
            if given and self.checkpoints.find(where={"checkpoint_id": {"in": given}}, fields=[], limit=1):
                for item in items:  # some are saved again: their sessions' best may move either way
                    self.save_checkpoint(session_id, **item)
                return ids
            self._put_new_checkpoints([row for row, _ in built])
            self.states.put_many([{"checkpoint_id": row["checkpoint_id"], "session_id": session_id, "state": state}
                                  for row, state in built if state is not None])
            self.history.put_many([self._entry(row["checkpoint_id"], session_id, "created", {"phi": row["phi"]})
                                   for row, _ in built])
        return ids

    def _new_checkpoint(self, session_id: Any, args: Mapping[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        """A checkpoint row (``is_best`` not yet set) and its encoded state, from ``save_checkpoint``'s arguments."""
        unknown = set(args) - _SAVE_ARGS
        if unknown:
            raise ls.ValidationError(
                f"checkpoints: unknown argument(s) {sorted(unknown)}; expected some of {sorted(_SAVE_ARGS)}"
            )
        if "phi" not in args:
            raise ls.ValidationError("checkpoints: phi is required")
        given = args.get("checkpoint_id")
        cid = new_id() if given is None else given
        if not isinstance(cid, str) or not cid:
            raise ls.ValidationError(f"checkpoints: checkpoint_id must be a non-empty string, got {cid!r}")
        where = f"checkpoints[{cid!r}]"
        kappa, created_at = args.get("kappa"), args.get("created_at")
        row = {
            "checkpoint_id": cid, "session_id": session_id, "phi": finite(args["phi"], f"{where}.phi"),
            "kappa": None if kappa is None else finite(kappa, f"{where}.kappa"), "regime": args.get("regime"),
            "basin_coords": args.get("basin_coords"), "metadata": args.get("metadata") or {},
            "created_at": now() if created_at is None else to_epoch(created_at, f"{where}.created_at"),
        }
        return row, encode_state(args.get("state_dict"))

    def _put_new_checkpoints(self, rows: list[dict[str, Any]]) -> None:
        """Write new checkpoint rows of one session, flagging ``is_best`` as saving them one by one would.

        The flag goes to the first of the new rows that ranks highest, if it outranks the
        session's current best, which then loses the flag (one partial update).
        """
        sid = rows[0]["session_id"]
        holders = self.checkpoints.find(where={"session_id": sid, "is_best": True}, fields=["phi", "created_at"])
        if not holders:  # a first checkpoint, or a session whose best was deleted behind the kit's back
            holders = self.checkpoints.find(where={"session_id": sid}, fields=["phi", "created_at", "is_best"],
                                            order_by=[*BEST_ORDER], limit=1)
        top = rows[0]
        for row in rows:
            row["is_best"] = False
            if _outranks(row, top):
                top = row
        top["is_best"] = all(_outranks(top, h) for h in holders)
        self.checkpoints.put_many(rows)
        if top["is_best"]:
            self.checkpoints.update_many({h["checkpoint_id"]: {"is_best": False} for h in holders if h.get("is_best", True)})

    def _fix_best(self, session_ids: Iterable[str]) -> None:
        """Make ``is_best`` true for exactly each session's top checkpoint (after a prune or a re-save)."""
        changes: dict[str, dict[str, Any]] = {}
        for sid in sorted(session_ids):
            top = self.checkpoints.find(where={"session_id": sid}, fields=["is_best"], order_by=[*BEST_ORDER], limit=1)
            holders = self.checkpoints.find(where={"session_id": sid, "is_best": True}, fields=[])
            best = top[0]["checkpoint_id"] if top else None
            changes.update({h["checkpoint_id"]: {"is_best": False} for h in holders if h["checkpoint_id"] != best})
            if top and not top[0]["is_best"]:
                changes[top[0]["checkpoint_id"]] = {"is_best": True}
        self.checkpoints.update_many(changes)

    def _log(self, checkpoint_id: str, session_id: str, action: str, details: dict[str, Any]) -> None:
        self.history.put(self._entry(checkpoint_id, session_id, action, details))

    @staticmethod
    def _entry(checkpoint_id: str, session_id: str, action: str, details: dict[str, Any]) -> dict[str, Any]:
        """A history entry (a row of ``checkpoint_history``), stamped now."""
        return {"history_id": new_id(), "checkpoint_id": checkpoint_id, "session_id": session_id,
                "action": action, "timestamp": now(), "details": details}

    def ranks(self, session_ids: Iterable[str]) -> dict[str, int]:
        """The rank of every checkpoint of these sessions: 1 = highest phi in its session (ties: older first)."""
        sids = sorted(set(session_ids))
        if not sids:
            return {}
        rows = self.checkpoints.find(where={"session_id": {"in": sids}}, fields=["session_id"],
                                     order_by=["session_id", *BEST_ORDER])
        out: dict[str, int] = {}
        current, rank = None, 0
        for r in rows:
            rank = rank + 1 if r["session_id"] == current else 1
            current = r["session_id"]
            out[r["checkpoint_id"]] = rank
        return out

    def _ranked(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fill each row's ``rank`` and ``is_best`` from the current ranking of its session."""
        ranks = self.ranks(r["session_id"] for r in rows)
        for row in rows:
            row["rank"] = ranks.get(row["checkpoint_id"])
            row["is_best"] = row["rank"] == 1
        return rows

    def _state(self, checkpoint_id: str) -> dict[str, Any] | None:
        """A checkpoint's state, unpacked: from ``checkpoint_states``, or from the row itself for checkpoints saved before."""
        found = self.states.get(checkpoint_id, fields=["state"])
        if found is not None:
            return decode_state(found["state"])
        legacy = self.checkpoints.get(checkpoint_id, fields=["state_dict"])
        return None if legacy is None else decode_state(legacy["state_dict"])

    def list_checkpoints(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Checkpoints (of a session, or all) without their state: by session, then rank (best first)."""
        where = None if session_id is None else {"session_id": session_id}
        rows = self.checkpoints.find(where, fields=self._meta, order_by=["session_id", *BEST_ORDER])
        return self._ranked(rows)

    def load_checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The checkpoint with its state_dict unpacked and its rank (logged as "loaded"), or None."""
        with self.store._all_or_nothing():
            row = self.checkpoints.get(checkpoint_id, fields=self._meta)
            if row is None:
                return None
            self._log(checkpoint_id, row["session_id"], "loaded", {})
            self._ranked([row])
            row["state_dict"] = self._state(checkpoint_id)
        return row

    def get_best_checkpoint(self, session_id: str | None = None) -> dict[str, Any] | None:
        """The checkpoint with the highest phi (of the session, or of the store), state unpacked; or None."""
        where = None if session_id is None else {"session_id": session_id}
        with self.store._all_or_nothing():  # one snapshot for the row and its state
            rows = self.checkpoints.find(where, fields=self._meta, order_by=[*BEST_ORDER], limit=1)
            if not rows:
                return None
            row = rows[0]
            row["rank"], row["is_best"] = 1, True  # the best of the store is the best of its session too
            row["state_dict"] = self._state(row["checkpoint_id"])
        return row

    def best_checkpoints(self, limit: int = 10) -> list[dict[str, Any]]:
        """The top checkpoints by phi across sessions, with their rank in their session, without their state_dict."""
        return self._ranked(self.checkpoints.find(None, fields=self._meta, order_by=[*BEST_ORDER], limit=limit))

    def prune_checkpoints(self, keep: int, *, session_id: str | None = None) -> list[str]:
        """Delete all but the ``keep`` best checkpoints by phi (of the session, or of the store).

        Logs a "pruned" entry per deleted checkpoint (with the rank it had); returns the deleted ids.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ls.ValidationError(f"prune_checkpoints: keep must be an int >= 1, got {keep!r}")
        where = None if session_id is None else {"session_id": session_id}
        with self.store._all_or_nothing():
            rows = self.checkpoints.find(where, fields=["session_id", "phi"], order_by=[*BEST_ORDER], offset=keep)
            ranks = self.ranks(r["session_id"] for r in rows)
            for row in rows:
                self._log(row["checkpoint_id"], row["session_id"], "pruned",
                          {"phi": row["phi"], "rank": ranks.get(row["checkpoint_id"])})
            ids = [r["checkpoint_id"] for r in rows]
            self.checkpoints.delete_many(ids)
            self.states.delete_many(ids)
            self._fix_best(r["session_id"] for r in rows)
        return ids

    def checkpoint_history(self, checkpoint_id: str | None = None) -> list[dict[str, Any]]:
        """History entries (created, loaded, pruned; "ranked" in stores written by earlier versions) in time order."""
        where = None if checkpoint_id is None else {"checkpoint_id": checkpoint_id}
        return self.history.find(where=where, order_by="timestamp")
