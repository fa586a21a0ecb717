"""The hybrid logical clock (HLC) that orders changes across stores.

An HLC value is one 64-bit integer: wall-clock milliseconds in the high bits and a
16-bit logical counter in the low bits. It never goes backwards within a store,
stays close to wall time, and compares as a plain integer. Ties between stores
are broken by store id (by the sync engine, not here).
"""

from __future__ import annotations

import time

LOGICAL_BITS = 16


def wall_hlc() -> int:
    """The HLC value of the current wall-clock time with a zero counter."""
    return (time.time_ns() // 1_000_000) << LOGICAL_BITS


def next_hlc(last: int) -> int:
    """The next HLC after ``last``: now, or ``last + 1`` if the wall clock is behind it."""
    now = wall_hlc()
    return now if now > last else last + 1


def observe(last: int, remote: int) -> int:
    """The clock value after seeing a remote value: later than both ``last`` and ``remote``."""
    return next_hlc(max(last, remote))


def hlc_millis(hlc: int) -> int:
    """The wall-clock milliseconds part of an HLC value."""
    return hlc >> LOGICAL_BITS


def hlc_seconds(hlc: int) -> float:
    """The wall-clock time of an HLC value, in Unix seconds."""
    return (hlc >> LOGICAL_BITS) / 1000.0
