"""A workspace: a folder of stores, one ``NAME.db`` file per agent."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any, Self

from .errors import StoreOpenError
from .names import check_store_name
from .store import Store

SUFFIX = ".db"


class Workspace:
    """A folder of stores: ``ws.open("kernel-7")`` is ``<dir>/kernel-7.db``.

    Opened stores are cached, so opening the same name twice returns the same
    object; ``close()`` closes them all. Listing reads only the folder, so it
    stays fast with thousands of stores.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, **store_options: Any) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreOpenError(f"workspace {self.path} is a file, not a folder; give a folder path")
        if not os.path.exists(self.path):
            if not create:
                raise StoreOpenError(f"no workspace folder at {self.path}; pass create=True to make one")
            try:
                _make_private_dirs(self.path)
            except OSError as exc:
                raise StoreOpenError(f"cannot create workspace folder {self.path}: {exc.strerror}") from None
        self._options = store_options
        self._open: dict[str, Store] = {}
        self._lock = threading.Lock()

    def path_of(self, name: str) -> str:
        """The file path of the store called ``name``."""
        return os.path.join(self.path, check_store_name(name) + SUFFIX)

    def open(self, name: str, **options: Any) -> Store:
        """Open (creating if missing) the store called ``name``; the same object is returned while it is open."""
        path = self.path_of(name)
        with self._lock:
            store = self._open.get(name)
            if store is not None and not store.closed:
                return store
            store = Store(path, **{**self._options, **options})
            self._open[name] = store
            return store

    def names(self) -> list[str]:
        """The names of the stores in the folder, sorted."""
        out = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(SUFFIX) and entry.is_file() and not name.startswith("."):
                    out.append(name[: -len(SUFFIX)])
        out.sort()
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def stores(self) -> Iterator[Store]:
        """Open each store in turn (sorted by name) and yield it; each stays open in the cache."""
        for name in self.names():
            yield self.open(name)

    def close(self) -> None:
        """Close every store this workspace opened."""
        with self._lock:
            stores, self._open = list(self._open.values()), {}
        for store in stores:
            store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<localstore.Workspace {self.path!r}>"


def _make_private_dirs(path: str) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``os.makedirs`` applies it to the last only)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    for folder in reversed(missing):
        os.mkdir(folder, 0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
