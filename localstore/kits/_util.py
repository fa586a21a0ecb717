"""Small helpers shared by the kits: timestamps and generated ids."""

from __future__ import annotations

import datetime as _dt
import math
import numbers
import time
import uuid
from typing import Any

import localstore as ls


def now() -> float:
    """The current time as Unix seconds (UTC)."""
    return time.time()


def to_epoch(value: Any, what: str) -> float:
    """Turn a timestamp (Unix seconds, a datetime, or an ISO 8601 string) into Unix seconds.

    A naive datetime or ISO string without an offset is taken as UTC.
    """
    if isinstance(value, bool):
        raise ls.ValidationError(f"{what}: expected a timestamp (Unix seconds, datetime or ISO 8601), got {value!r}")
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ls.ValidationError(f"{what}: expected a finite timestamp, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ls.ValidationError(f"{what}: {value!r} is not an ISO 8601 timestamp") from None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return float(value.timestamp())
    raise ls.ValidationError(f"{what}: expected a timestamp (Unix seconds, datetime or ISO 8601), got {value!r}")


def new_id() -> str:
    """A random 32-hex-digit id, unique across stores."""
    return uuid.uuid4().hex


def finite(value: Any, what: str, *, low: float | None = None, high: float | None = None) -> float:
    """Check that a value is a finite real number (within [low, high] when given); return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ls.ValidationError(f"{what}: expected a finite number, got {value!r}")
    number = float(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ls.ValidationError(f"{what}: expected a number in [{low}, {high}], got {value!r}")
    return number
