"""A tiny progress bar for the kits' importers: stderr when it is a terminal, or a callback.

    with Progress("import run.jsonl", total=size, unit="B") as bar:
        for chunk in ...:
            bar.update(len(chunk))

``make_progress(progress, label, total)`` turns an importer's ``progress=``
argument into a bar: None draws on stderr only when it is a terminal, False draws
nothing, and a function ``fn(done, total)`` is called after each update instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Self

#: Seconds between redraws on a terminal (0 redraws on every update).
DEFAULT_REDRAW_INTERVAL = 0.1
DEFAULT_WIDTH = 30

ProgressCallback = Callable[[int, int | None], None]


def _human(n: float, unit: str) -> str:
    if unit == "B":
        for name in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or name == "GiB":
                return f"{n:.0f} {name}" if name == "B" else f"{n:.1f} {name}"
            n /= 1024
    return f"{n:,.0f}{' ' + unit if unit else ''}"


class Progress:
    """A one-line bar redrawn in place; silent unless ``stream`` is a terminal or a callback is given."""

    def __init__(
        self, label: str, total: int | None = None, *, unit: str = "", callback: ProgressCallback | None = None,
        stream: IO[str] | None = None, enabled: bool | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.callback = label, total, unit, callback
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if enabled is None else enabled
        self.done = 0
        self._drawn_at = 0.0
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.live:
            t = time.monotonic()
            if t - self._drawn_at >= DEFAULT_REDRAW_INTERVAL or (self.total is not None and self.done >= self.total):
                self._drawn_at = t
                self._draw()

    def _draw(self) -> None:
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * DEFAULT_WIDTH)
            bar = "#" * filled + "-" * (DEFAULT_WIDTH - filled)
            text = f"\r{self.label} [{bar}] {frac:4.0%} {_human(self.done, self.unit)}/{_human(self.total, self.unit)}"
        else:
            text = f"\r{self.label} {_human(self.done, self.unit)}"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.live and not self._closed:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_progress(progress: Any, label: str, total: int | None, *, unit: str = "") -> Progress:
    """A bar for an importer's ``progress=`` argument: None (terminal only), False (off), or fn(done, total)."""
    if progress is False:
        return Progress(label, total, unit=unit, enabled=False)
    if callable(progress):
        return Progress(label, total, unit=unit, callback=progress, enabled=False)
    if progress is None or progress is True:
        return Progress(label, total, unit=unit, enabled=None if progress is None else True)
    raise TypeError(f"progress must be None, True, False or a function(done, total), got {progress!r}")
