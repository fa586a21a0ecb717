"""The exception tree of localstore: one root, ``LocalStoreError``.

Every message says what happened, to which store, collection or field, and what
to do about it. apsw errors are wrapped at the boundary (see ``_sqlite.py``), so
callers never see a raw ``apsw.BusyError`` or "database is locked".
"""

from __future__ import annotations


class LocalStoreError(Exception):
    """The root of every error localstore raises."""


class StoreOpenError(LocalStoreError):
    """The path given to ``open`` cannot be used as a store (a directory, an unreadable path)."""


class NotAStoreError(StoreOpenError):
    """The file exists but is not a localstore store: not SQLite at all, or another program's database."""


class CorruptStoreError(LocalStoreError):
    """SQLite reports the store file as damaged; restore it from a backup or a sync."""


class StoreClosedError(LocalStoreError):
    """The store was closed; open it again to use it."""


class StoreBusyError(LocalStoreError):
    """Another writer held the store for longer than the busy timeout allows."""


class ReadOnlyStoreError(LocalStoreError):
    """The store file or its folder cannot be written."""


class SchemaError(LocalStoreError):
    """A collection declaration is invalid or incompatible with the schema kept in the file."""


class InvalidNameError(SchemaError, ValueError):
    """A collection, field or store name is not a valid identifier."""


class UnknownCollectionError(SchemaError, KeyError):
    """``store.collection(name)`` was called without fields for a collection that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotYetSupportedError(LocalStoreError, NotImplementedError):
    """A declared option (encrypt, compress, filter, fulltext, ...) is not implemented in this version."""


class ValidationError(LocalStoreError, ValueError):
    """A value does not match its field's declared type, or a row is malformed."""


class NotFoundError(LocalStoreError, KeyError):
    """An operation on existing rows (``Collection.update``) named a key that has no row; ``put`` creates rows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QueryError(LocalStoreError, ValueError):
    """A ``where``, ``order_by`` or other query argument is malformed."""


class ChangeLogError(LocalStoreError):
    """A change-log operation is invalid, such as acknowledging a seq that was never written."""


class BackupError(LocalStoreError):
    """A backup could not be written."""


class CryptoError(LocalStoreError):
    """The root of key and encryption errors: keys, wrong or missing master keys, tampered values."""


class KeyFileError(CryptoError, ValueError):
    """A master key (argument, ``LOCALSTORE_KEY`` or key file) is malformed, or its file is readable by others."""


class WrongKeyError(CryptoError, KeyError):
    """The master key does not unlock the store's keys; raised at open, before any data is read."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingKeyError(CryptoError, KeyError):
    """A value needs a key that is not available: no master key given, or a key absent from this file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TamperedValueError(CryptoError):
    """A stored encrypted value fails authentication: altered bytes, or moved from another row, field or store."""


class CodecError(LocalStoreError):
    """A stored compressed value cannot be decoded (damaged bytes or an unknown format)."""


class MissingDictionaryError(CodecError):
    """A value was compressed with a zstd dictionary that this store's ``_ls_dicts`` table does not hold."""
