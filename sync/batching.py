"""Pure position, batching, backoff and debounce logic: no I/O, unit-tested; the loops that drive it are thin."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

#: Most changes shipped in one Postgres transaction. 0 is not allowed.
DEFAULT_BATCH_ROWS = 5_000

#: Soft cap on the payload bytes of one batch; a batch always holds at least one change. 0 is not allowed.
DEFAULT_BATCH_BYTES = 8 * 1024 * 1024

#: First retry delay after Postgres fails, in seconds; doubles on each failure up to the cap.
DEFAULT_BACKOFF_BASE_S = 0.2

#: Longest retry delay, in seconds.
DEFAULT_BACKOFF_CAP_S = 30.0

#: How long the daemon waits after the last file event of a store before syncing it, in seconds.
#: 0 syncs on the first event (no coalescing).
DEFAULT_DEBOUNCE_S = 0.02

#: The longest a steady stream of writes can postpone a store's sync, in seconds.
DEFAULT_DEBOUNCE_MAX_S = 0.1


@dataclass(frozen=True)
class Positions:
    """Where one store stands: its last seq written, its watermark, and what Postgres holds for it."""

    last_seq: int
    watermark: int
    central_seq: int  # the highest seq Postgres committed for this store (0 if none)


def plan(p: Positions) -> tuple[str, int]:
    """Decide the next step for a store: ``("conflict", seq)``, ``("ack", seq)``, ``("ship", after)`` or ``("idle", seq)``.

    - Postgres ahead of the file's own counter means the file is an old copy: shipping
      would reuse seqs, so it is refused (``conflict``).
    - Postgres ahead of the watermark means an acknowledgement was lost after the commit:
      acknowledge first (``ack``); nothing is shipped twice.
    - Otherwise ship what follows the watermark, or nothing.
    """
    if p.central_seq > p.last_seq:
        return "conflict", p.central_seq
    if p.central_seq > p.watermark:
        return "ack", p.central_seq
    if p.last_seq > p.watermark:
        return "ship", p.watermark
    return "idle", p.watermark


def ack_point(seqs: list[int], after: int) -> int:
    """The seq to acknowledge after committing a batch: its last seq. Raise if the batch is not in order after ``after``."""
    if not seqs:
        return after
    prev = after
    for seq in seqs:
        if seq <= prev:
            raise ValueError(f"batch out of order: seq {seq} after {prev}")
        prev = seq
    return prev


def latest_flags(keys: list[Any]) -> list[bool]:
    """For each position of a batch's keys (seq order): whether no later change in the batch has the same key.

    The current state needs only those changes; the change log takes them all.
    """
    seen: set[Any] = set()
    flags = [False] * len(keys)
    for i in range(len(keys) - 1, -1, -1):
        key = keys[i]
        if key not in seen:
            seen.add(key)
            flags[i] = True
    return flags


@dataclass
class Backoff:
    """Exponential backoff with jitter: each delay is uniform in [d/2, d], d doubling from ``base`` to ``cap``."""

    base: float = DEFAULT_BACKOFF_BASE_S
    cap: float = DEFAULT_BACKOFF_CAP_S
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before the next attempt, in seconds."""
        ceiling = min(self.cap, self.base * float(2 ** min(self.failures, 30)))
        self.failures += 1
        return float(ceiling * (0.5 + 0.5 * self.rng.random()))

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0


@dataclass
class Debouncer:
    """Coalesce bursts of events per key: a key is due ``delay`` seconds after its latest event.

    ``max_delay`` bounds how long a constant stream of events can postpone a key.
    Times are plain floats (``time.monotonic()``), passed in, so this is pure.
    """

    delay: float = DEFAULT_DEBOUNCE_S
    max_delay: float = DEFAULT_DEBOUNCE_MAX_S
    _due: dict[str, float] = field(default_factory=dict)
    _first: dict[str, float] = field(default_factory=dict)

    def touch(self, key: str, now: float) -> None:
        """Record an event for ``key`` at ``now``."""
        first = self._first.setdefault(key, now)
        self._due[key] = min(now + self.delay, first + self.max_delay)

    def schedule(self, key: str, at: float) -> None:
        """Make ``key`` due at ``at`` (a retry), or earlier if it already is."""
        current = self._due.get(key)
        self._due[key] = at if current is None else min(current, at)
        self._first.setdefault(key, at)

    def pop_due(self, now: float) -> list[str]:
        """The keys due at ``now``, removed, oldest deadline first."""
        due = sorted((at, k) for k, at in self._due.items() if at <= now)
        for _, key in due:
            del self._due[key]
            self._first.pop(key, None)
        return [k for _, k in due]

    def next_deadline(self) -> float | None:
        """The earliest pending deadline, or None when nothing is pending (the loop then sleeps until an event)."""
        return min(self._due.values()) if self._due else None

    def __len__(self) -> int:
        return len(self._due)
