"""localstore: an embedded, local-first storage engine for AI-agent experiments.

Every agent gets its own WAL-mode SQLite file holding its collections and a
change log; a central PostgreSQL is optional.

    import localstore as ls
    store = ls.open("data/kernel-7.db")
    kernels = store.collection("kernels", key="kernel_id", fields={
        "kernel_id": ls.Text(), "phi": ls.Real(index=True), "basin": ls.Vector(64),
    })
    kernels.put({"kernel_id": "k1", "phi": 0.8, "basin": [0.0] * 64})
"""

from .changelog import Change, ChangeLog
from .collection import Collection
from .errors import (
    BackupError,
    ChangeLogError,
    CodecError,
    CorruptStoreError,
    CryptoError,
    InvalidNameError,
    KeyFileError,
    LocalStoreError,
    MissingDictionaryError,
    MissingKeyError,
    NotAStoreError,
    NotFoundError,
    NotYetSupportedError,
    QueryError,
    ReadOnlyStoreError,
    SchemaError,
    StoreBusyError,
    StoreClosedError,
    StoreOpenError,
    TamperedValueError,
    UnknownCollectionError,
    ValidationError,
    WrongKeyError,
)
from .fields import Array, Blob, Boolean, Field, Integer, Json, Real, Text, Vector
from .keys import FORGOTTEN, Forgotten, generate_key, write_key_file
from .maintenance import StoreStats, VerifyReport
from .store import Store, open
from .workspace import Workspace

__version__ = "0.1.0.dev0"

__all__ = [
    "FORGOTTEN",
    "Array",
    "BackupError",
    "Blob",
    "Boolean",
    "Change",
    "ChangeLog",
    "ChangeLogError",
    "CodecError",
    "Collection",
    "CorruptStoreError",
    "CryptoError",
    "Field",
    "Forgotten",
    "Integer",
    "InvalidNameError",
    "Json",
    "KeyFileError",
    "LocalStoreError",
    "MissingDictionaryError",
    "MissingKeyError",
    "NotAStoreError",
    "NotFoundError",
    "NotYetSupportedError",
    "QueryError",
    "ReadOnlyStoreError",
    "Real",
    "SchemaError",
    "Store",
    "StoreBusyError",
    "StoreClosedError",
    "StoreOpenError",
    "StoreStats",
    "TamperedValueError",
    "Text",
    "UnknownCollectionError",
    "ValidationError",
    "Vector",
    "VerifyReport",
    "Workspace",
    "WrongKeyError",
    "__version__",
    "generate_key",
    "open",
    "write_key_file",
]
