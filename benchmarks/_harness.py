"""Helpers shared by every benchmark: timing, ratios and targets, table and JSON, English text.

A benchmark module builds one ``Report``: ``Timing`` records (several runs of one
operation, each run timed with ``time.perf_counter``) and ``Figure`` records
derived from them (ratios against a baseline measured in the same run, or a
per-operation time), each optionally with a target. Targets are informational:
a miss is printed, never raised. ``english_text`` gives realistic text (sentences
from standard-library docstrings) for rows, so no benchmark times random letters.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import math
import operator
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Comparison operators a target may use, by their printed symbol.
TARGET_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass
class Case:
    """One operation to time: ``run(setup())`` is timed; ``setup`` and ``teardown`` are not.

    ``teardown(state)`` runs after every run, also when it raised, so files and
    connections made by ``setup`` are always closed.
    """

    name: str
    run: Callable[[Any], object]
    setup: Callable[[], Any] = lambda: None
    teardown: Callable[[Any], None] = lambda state: None
    #: How many items (rows, opens, stores) one run handles; rates and per-item times use it.
    items: int = 1
    unit: str = "op"
    label: str = ""


@dataclass
class Timing:
    """Wall-clock seconds of each run of one operation, with the item count per run."""

    name: str
    label: str
    runs: list[float]
    items: int = 1
    unit: str = "op"

    @property
    def median(self) -> float:
        """The median run time, in seconds."""
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        """The fastest run time, in seconds."""
        return min(self.runs)

    @property
    def rate(self) -> float:
        """Items per second at the median run time."""
        return self.items / self.median

    @property
    def best_rate(self) -> float:
        """Items per second at the fastest run time."""
        return self.items / self.best

    @property
    def per_item(self) -> float:
        """Seconds per item at the median run time."""
        return self.median / self.items

    def to_json(self) -> dict[str, Any]:
        """The timing as a JSON-ready dict (times in seconds, rates in items per second)."""
        return {
            "label": self.label,
            "unit": self.unit,
            "items": self.items,
            "repeat": len(self.runs),
            "median_s": self.median,
            "best_s": self.best,
            "rate_per_s": self.rate,
            "best_rate_per_s": self.best_rate,
            "per_item_ms": self.per_item * 1e3,
            "runs_s": list(self.runs),
        }


@dataclass
class Figure:
    """A headline number (a ratio, a per-operation time) with an optional target."""

    name: str
    label: str
    value: float
    unit: str
    target_op: str | None = None
    target: float | None = None
    note: str = ""
    #: Our side and each peer's side of a ratio, as printed (``"12.3 ms"``), for the combined table.
    ours: str = ""
    peers: dict[str, str] = field(default_factory=dict)
    #: Why the figure could not be measured (a peer not installed); empty when it was.
    skipped: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None when the figure has no target or was skipped."""
        if self.target_op is None or self.target is None or self.skipped:
            return None
        return TARGET_OPS[self.target_op](self.value, self.target)

    def to_json(self) -> dict[str, Any]:
        """The figure as a JSON-ready dict."""
        value = None if self.skipped else self.value
        out: dict[str, Any] = {"label": self.label, "value": value, "unit": self.unit}
        if self.target_op is not None:
            out["target"] = {"op": self.target_op, "value": self.target, "met": self.met}
        if self.note:
            out["note"] = self.note
        if self.ours:
            out["ours"] = self.ours
        if self.peers:
            out["peers"] = dict(self.peers)
        if self.skipped:
            out["skipped"] = self.skipped
        return out


@dataclass
class Report:
    """Everything one benchmark measured in one run: parameters, timings, figures, notes."""

    name: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Timing] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, *timings: Timing) -> None:
        """Add timings, keyed by name."""
        for timing in timings:
            self.timings[timing.name] = timing

    def figure(self, figure: Figure) -> Figure:
        """Add a figure, keyed by name, and return it."""
        self.figures[figure.name] = figure
        return figure

    def speed_ratio(
        self,
        name: str,
        label: str,
        ours: str,
        baseline: str,
        *,
        target_op: str | None = None,
        target: float | None = None,
    ) -> Figure:
        """Add ``ours``'s throughput over ``baseline``'s (per-item medians); above 1 is faster."""
        return self._ratio(name, label, ours, baseline, target_op, target, faster=True)

    def cost_ratio(
        self,
        name: str,
        label: str,
        ours: str,
        baseline: str,
        *,
        target_op: str | None = None,
        target: float | None = None,
    ) -> Figure:
        """Add ``ours``'s time over ``baseline``'s (per-item medians); above 1 is slower."""
        return self._ratio(name, label, ours, baseline, target_op, target, faster=False)

    def _ratio(self, name: str, label: str, ours: str, baseline: str, target_op: str | None,
               target: float | None, *, faster: bool) -> Figure:
        a, b = self.timings[ours], self.timings[baseline]
        value = b.per_item / a.per_item if faster else a.per_item / b.per_item
        return self.figure(Figure(name, label, value, "x", target_op, target, ours=_side(a), peers={b.name: _side(b)}))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_json`` output (``run.py all`` runs each part in its own process)."""
        report = cls(data["name"], bool(data["quick"]), params=dict(data.get("params", {})),
                     notes=list(data.get("notes", [])), elapsed_s=float(data.get("elapsed_s", 0.0)))
        for name, t in data.get("timings", {}).items():
            report.add(Timing(name, t["label"], [float(r) for r in t["runs_s"]], int(t["items"]), t["unit"]))
        for name, f in data.get("figures", {}).items():
            target = f.get("target") or {}
            report.figure(Figure(
                name, f["label"], float("nan") if f.get("value") is None else float(f["value"]), f["unit"],
                target.get("op"), target.get("value"), note=f.get("note", ""), ours=f.get("ours", ""),
                peers=dict(f.get("peers", {})), skipped=f.get("skipped", "")))
        return report

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "name": self.name,
            "quick": self.quick,
            "params": self.params,
            "elapsed_s": self.elapsed_s,
            "timings": {k: t.to_json() for k, t in self.timings.items()},
            "figures": {k: f.to_json() for k, f in self.figures.items()},
            "targets_met": all(f.met is not False for f in self.figures.values()),
            "notes": list(self.notes),
        }


def _side(timing: Timing) -> str:
    """One side of a ratio for the combined table: a rate when a run handles many items, else a time."""
    if timing.items > 1:
        return fmt_rate(timing.rate, timing.unit)
    return fmt_seconds(timing.median)


def measure(
    cases: Sequence[Case], repeat: int, *, warmup: int = 0, progress: str = ""
) -> list[Timing]:
    """Time every case ``repeat`` times, interleaved (a, b, a, b, ...), after ``warmup`` rounds.

    Interleaving spreads slow phases of a shared machine over all cases alike.
    The garbage collector is off during each timed call (as in ``timeit``) and a
    full collection runs before it, so one case's garbage is not billed to the next.
    """
    runs: dict[str, list[float]] = {case.name: [] for case in cases}
    if progress:
        warm = f" after {warmup} warm-up" if warmup else ""
        log(f"{progress}: {len(cases)} case(s), {repeat} timed round(s){warm}")
    for round_no in range(warmup + repeat):
        for case in cases:
            elapsed = _time_once(case)
            if round_no >= warmup:
                runs[case.name].append(elapsed)
    return [Timing(c.name, c.label or c.name, runs[c.name], c.items, c.unit) for c in cases]


def _time_once(case: Case) -> float:
    state = case.setup()
    try:
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            case.run(state)
            elapsed = time.perf_counter() - start
        finally:
            if enabled:
                gc.enable()
    finally:
        case.teardown(state)
    return elapsed


def time_once(fn: Callable[[], object]) -> float:
    """Run ``fn`` once and return its wall-clock seconds (for one-off set-up figures)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


#: Set to 1 to shrink every ``--quick`` size further, for smoke tests (figures are then meaningless).
TINY_ENV = "LOCALSTORE_BENCH_TINY"


def is_tiny() -> bool:
    """Whether ``LOCALSTORE_BENCH_TINY`` asks for tiny sizes (smoke tests only)."""
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def log(message: str) -> None:
    """Print a progress line to stderr, so stdout stays a clean table or JSON object."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    """Facts about the machine and libraries that the figures depend on."""
    import sqlite3

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "stdlib_sqlite": sqlite3.sqlite_version,
    }
    try:
        import apsw

        env["apsw"] = apsw.apsw_version()
        env["apsw_sqlite"] = apsw.sqlite_lib_version()
    except ImportError:
        pass
    return env


# -- data ----------------------------------------------------------------------------

#: Modules whose docstrings give the benchmark text: real English of the kind agents store.
_CORPUS_MODULE_NAMES = """
    os json collections itertools functools pathlib re string textwrap inspect typing datetime
    random statistics argparse logging subprocess threading asyncio email http.client urllib.parse
    csv sqlite3 shutil tempfile dataclasses enum heapq bisect contextlib decimal fractions io pickle
    socket zipfile tarfile unittest difflib calendar math operator abc copy pprint queue sched
    selectors struct uuid hashlib hmac secrets base64 gzip configparser glob fnmatch locale gettext
    codecs html timeit traceback warnings weakref types zlib
"""
CORPUS_MODULES = tuple(_CORPUS_MODULE_NAMES.split())

_SENTENCES: list[str] = []


def corpus_sentences() -> list[str]:
    """English sentences from standard-library docstrings, de-duplicated, in a stable order."""
    if _SENTENCES:
        return _SENTENCES
    docs: list[str] = []
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                for member, value in sorted(vars(obj).items()):
                    doc = getattr(value, "__doc__", None)
                    if not member.startswith("_") and isinstance(doc, str):
                        docs.append(inspect.cleandoc(doc))
    seen: dict[str, None] = {}
    for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", " ".join(docs))):
        letters = sum(c.isalpha() or c == " " for c in sentence)
        if 20 <= len(sentence) <= 300 and letters > 0.85 * len(sentence):
            seen.setdefault(sentence, None)
    _SENTENCES[:] = seen
    return _SENTENCES


def english_text(rng: random.Random, size: int) -> str:
    """About ``size`` characters (within 20%) of docstring sentences picked by ``rng``."""
    sentences = corpus_sentences()
    want = rng.randint(size * 4 // 5, size * 6 // 5)
    parts: list[str] = []
    total = 0
    while total < want:
        sentence = rng.choice(sentences)
        parts.append(sentence)
        total += len(sentence) + 1
    text = " ".join(parts)
    if len(text) > want:
        cut = text.rfind(" ", 0, want)
        text = text[: cut if cut > want // 2 else want]
    return text


# -- rendering -----------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    """A duration with a unit that keeps three significant digits readable."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_rate(rate: float, unit: str) -> str:
    """Items per second with thousands separators, e.g. ``102,227 rows/s``."""
    return f"{rate:,.0f} {unit}s/s"


def fmt_value(value: float, unit: str) -> str:
    """A figure's value with its unit."""
    if unit == "x":
        return f"{value:.2f}x"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.3g} {unit}" if abs(value) < 1000 else f"{value:,.0f} {unit}"


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]
) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(report: Report) -> str:
    """The report as a readable text table: timings, then figures with their targets (pass/MISS)."""
    params = ", ".join(
        f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in report.params.items()
    )
    out = [
        f"== {report.name}{' (quick)' * report.quick}  [{params}]  {report.elapsed_s:.1f} s",
        "",
    ]
    rows = []
    for t in report.timings.values():
        per = fmt_rate(t.rate, t.unit) if t.items > 1 else ""
        per_item = fmt_seconds(t.per_item) + f"/{t.unit}" if t.items > 1 else ""
        rows.append(
            [t.label, f"{len(t.runs)}", fmt_seconds(t.median), fmt_seconds(t.best), per, per_item]
        )
    out += _table(
        ["measurement", "n", "median", "best", "rate (median)", "per item"],
        rows,
        [False, True, True, True, True, True],
    )
    out.append("")
    rows = []
    for f in report.figures.values():
        target = ""
        if f.target_op is not None and f.target is not None:
            target = f"{f.target_op} {fmt_value(f.target, f.unit)}"
        marker = {True: "pass", False: "MISS", None: ""}[f.met]
        value = "skipped" if f.skipped else fmt_value(f.value, f.unit)
        rows.append([f.label, value, target, marker, f.skipped or f.note])
    headers, right = ["figure", "value", "target", "", "note"], [False, True, False, False, False]
    if not any(f.note or f.skipped for f in report.figures.values()):
        headers, right, rows = headers[:-1], right[:-1], [r[:-1] for r in rows]
    out += _table(headers, rows, right)
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


class Scratch:
    """Hands out fresh file paths in one temporary folder and deletes each store's files."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._n = 0

    def path(self, stem: str) -> str:
        """A path that no file has used yet in this run."""
        self._n += 1
        return os.path.join(self.root, f"{stem}-{self._n}.db")

    @staticmethod
    def remove(path: str) -> None:
        """Delete a store file and its -wal and -shm companions."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
