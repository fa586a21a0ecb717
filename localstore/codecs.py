"""Field codecs: how ``encrypt=True`` and ``compress=True`` values are written and read back.

Write: field.encode (validate) -> bytes -> compress (zstd, flagged) -> encrypt (AES-256-GCM).
Read: decrypt -> decompress -> field.decode. A collection without such fields never
touches this module, so its write path is unchanged.

A value's plain bytes are: UTF-8 for Text and Json, the bytes themselves for Blob,
Array and Vector, 8 bytes big-endian for Integer and Boolean, an IEEE double for
Real. The column of a codec field is a BLOB; ``keys.py`` and ``dictionaries.py``
describe the key and dictionary tables, ``crypto.py`` the encrypted format.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import crypto
from ._sqlite import boundary, quote
from .dictionaries import DEFAULT_MIN_VALUE_BYTES, Dictionaries, FieldCompressor
from .errors import (
    CodecError,
    CorruptStoreError,
    MissingDictionaryError,
    MissingKeyError,
    QueryError,
    SchemaError,
    TamperedValueError,
    ValidationError,
)
from .fields import Array, Blob, Boolean, Field, Integer, Json, Real, Text, Vector
from .keys import FORGOTTEN, KeyRing

if TYPE_CHECKING:
    from .collection import Collection

_INT = struct.Struct(">q")
_REAL = struct.Struct(">d")

#: Most blind-index tags matched with index range scans; beyond, one scan compares prefixes.
DEFAULT_MAX_RANGE_TAGS = 64


def uses_codec(field: Field) -> bool:
    """Whether a field's values go through this module (encrypt or compress)."""
    return bool(getattr(field, "encrypt", False) or getattr(field, "compress", False))


def check_declaration(name: str, key: str, fields: dict[str, Field]) -> None:
    """Cross-field checks: the key stays in the clear, and a ``subject`` names a plain Text/Integer field."""
    key_field = fields.get(key)
    if key_field is not None and uses_codec(key_field):
        raise SchemaError(f"{name}.{key}: the key cannot be encrypted or compressed; it identifies the row")
    for fname, f in fields.items():
        subject = getattr(f, "subject", None)
        if subject is None:
            continue
        target = fields.get(subject)
        if target is None or subject == fname:
            raise SchemaError(
                f"{name}.{fname}: subject={subject!r} must name another field of the collection "
                f"({', '.join(n for n in fields if n != fname)})"
            )
        if uses_codec(target) or not isinstance(target, (Text, Integer)):
            raise SchemaError(f"{name}.{fname}: its subject field {subject!r} must be a plain Text or Integer field")


def _to_bytes_for(field: Field) -> Callable[[Any], bytes]:
    if isinstance(field, (Text, Json)):
        return lambda v: v.encode("utf-8")
    if isinstance(field, (Integer, Boolean)):
        return lambda v: _INT.pack(v)
    if isinstance(field, Real):
        return lambda v: _REAL.pack(v)
    return lambda v: bytes(v)


def _from_bytes_for(field: Field) -> Callable[[bytes], Any]:
    if isinstance(field, (Text, Json)):
        return lambda b: b.decode("utf-8")
    if isinstance(field, (Integer, Boolean)):
        return lambda b: _INT.unpack(b)[0]
    if isinstance(field, Real):
        return lambda b: _REAL.unpack(b)[0]
    return bytes


class FieldCodec:
    """Encodes and decodes one field's values; also answers blind-index conditions."""

    def __init__(self, coll: Collection, field: Field, book: Dictionaries, keys: KeyRing) -> None:
        self.store = coll.store
        self.collection, self.name = coll.name, field.name
        self.field = field
        self.keys, self.book = keys, book
        self.encrypt, self.compress = field.encrypt, field.compress
        self.subject: str | None = getattr(field, "subject", None)
        self.blind = bool(getattr(field, "blind_index", False))
        self.label = f"{coll.name}\x00{field.name}"
        self.aad = crypto.aad_prefix(self.store.id, coll.name, field.name)
        self.to_bytes = _to_bytes_for(field)
        self.from_bytes = _from_bytes_for(field)
        self.field_decode = field.decode if type(field).decode is not Field.decode else None
        self._subject_encode = coll._fields[self.subject].encode if self.subject else None
        self._refreshed: Any = None
        self.compressor: FieldCompressor | None = None
        if self.compress:
            itemsize = 0 if isinstance(field, Array) else 4 if isinstance(field, Vector) else None
            trainable = not self.encrypt and isinstance(field, (Text, Json, Blob))
            self.compressor = FieldCompressor(
                book, coll.name, field.name, trainable=trainable, itemsize=itemsize,
                samples=self._samples if trainable else None, checked=not self.encrypt,
            )

    def where(self, key: Any) -> str:
        """The context every error names: store, collection, field, key."""
        return f"store {self.store.path}, collection {self.collection!r}, field {self.name!r}, key {key!r}"

    # -- write ---------------------------------------------------------------------------

    def encode(self, value: Any, key: Any, row: dict[str, Any]) -> bytes:
        """Turn a validated stored value into the bytes kept in the column (and the change log)."""
        try:
            data = self.to_bytes(value)
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"{self.collection}.{self.name}: expected valid unicode text, got a lone surrogate "
                f"{exc.object[exc.start:exc.end]!r} in key {key!r}; nothing was written"
            ) from None
        plain = data
        if self.compressor is not None:
            data = self.compressor.compress(data)
        if not self.encrypt:
            return data
        keys = self.keys
        if self._refreshed is not self.store._tx:
            keys.refresh()
            self._refreshed = self.store._tx
        subject_kid = None
        if self.subject is not None:
            subject = row.get(self.subject)
            if subject is None:
                raise ValidationError(
                    f"{self.collection}.{self.name}: the row has no {self.subject!r}, which names whose key "
                    f"encrypts this field (subject={self.subject!r}); key {key!r}"
                )
            subject = self._subject_encode(subject)  # type: ignore[misc]
            key_id, cipher = keys.subject_key(subject)
            subject_kid = key_id
        else:
            key_id, cipher = keys.data_key()
        tag = None
        if self.blind:
            index_key = keys.blind_key(self.label, subject_kid, True)
            assert index_key is not None
            tag = crypto.blind_tag(index_key, plain)
        return crypto.encrypt(cipher, key_id, data, crypto.aad_for(self.aad, key), tag)

    def fast_encoder(self) -> Callable[[Any, Any, dict[str, Any]], bytes] | None:
        """A fused ``encode`` for the common case (Text or Json, no subject, no blind index, plain zstd or none).

        It writes exactly what ``encode`` and ``crypto.encrypt`` write, and falls back to
        ``encode`` whenever anything needs checking (a new transaction, a fresh or full key).
        """
        comp = self.compressor
        if (not self.encrypt or self.subject is not None or self.blind or not isinstance(self.field, (Text, Json))
                or (comp is not None and (comp.itemsize is not None or comp.trainable))):
            return None
        keys, store, slow, aad = self.keys, self.store, self.encode, self.aad
        urandom, pack_kid = os.urandom, struct.Struct(">I").pack
        zstd_compress = self.book.plain.compress if comp is not None else None
        minimum = DEFAULT_MIN_VALUE_BYTES
        # Values large enough to be probed take the slow path, which probes them as encode does.
        probed = comp.probe_bytes if comp is not None and comp.probe_bytes is not None else float("inf")

        def encode(value: Any, key: Any, row: dict[str, Any]) -> bytes:
            tx = store._tx
            if (keys._used >= keys._reserved or keys._reserve_tx is not tx or self._refreshed is not tx
                    or keys._current in keys._created):
                return slow(value, key, row)
            try:
                data = value.encode("utf-8")
            except UnicodeEncodeError:
                return slow(value, key, row)
            if len(data) >= probed:
                return slow(value, key, row)
            if zstd_compress is not None:
                if len(data) >= minimum:
                    frame = zstd_compress(data)
                    data = b"\x01" + frame if len(frame) < len(data) else b"\x00" + data
                else:
                    data = b"\x00" + data
            keys._used += 1
            key_id = keys._current
            head = b"\xe1" + pack_kid(key_id)
            nonce = urandom(crypto.NONCE_BYTES)
            bound = aad + (b"s" + key.encode("utf-8", "surrogatepass") if type(key) is str else b"i" + str(key).encode())
            return head + nonce + keys._ciphers[key_id].encrypt(nonce, data, bound + head)  # type: ignore[index]

        return encode

    def _samples(self, limit: int) -> list[bytes]:
        """Recent stored values of this (unencrypted) field, decompressed, newest first, up to ``limit`` bytes."""
        out: list[bytes] = []
        total = 0
        column = quote(self.name)
        with boundary(self.store.path, f"reading samples of {self.collection}.{self.name} to train a dictionary"):
            cursor = self.store._db.execute(
                f"SELECT {column} FROM {quote(self.collection)} WHERE {column} IS NOT NULL ORDER BY rowid DESC"
            )
            for (stored,) in cursor:
                try:
                    value = self.book.decompress(stored)
                except (LookupError, CodecError):
                    continue
                out.append(value)
                total += len(value)
                if total >= limit:
                    break
        return out

    # -- read ----------------------------------------------------------------------------

    def decode(self, stored: Any, key: Any) -> Any:
        """Turn a column value back into the Python value; FORGOTTEN if its subject was forgotten."""
        data = stored
        if self.encrypt:
            if not isinstance(data, bytes):
                raise TamperedValueError(f"{self.where(key)}: the stored value is not an encrypted value")
            try:
                key_id = crypto.key_id_of(data)
            except crypto.DecryptFailed:
                raise TamperedValueError(
                    f"{self.where(key)}: the stored value has no valid encryption header (damaged or altered)"
                ) from None
            try:
                cipher = self.keys.cipher(key_id)
            except MissingKeyError as exc:
                reason = str(exc).removeprefix(f"store {self.store.path}: ")
                raise MissingKeyError(f"{self.where(key)}: {reason}") from None
            except LookupError as exc:
                raise MissingKeyError(f"{self.where(key)}: {exc.args[0] if exc.args else exc}") from None
            if cipher is None:
                return FORGOTTEN
            try:
                data = crypto.decrypt(cipher, data, crypto.aad_for(self.aad, key))
            except crypto.DecryptFailed:
                raise TamperedValueError(
                    f"{self.where(key)}: the encrypted value fails authentication: its bytes were altered, or it "
                    "was copied from another row, field or store. Restore the row from a backup or a sync"
                ) from None
        if self.compress:
            if not isinstance(data, bytes):
                raise CodecError(f"{self.where(key)}: the stored value is not a compressed value")
            try:
                data = self.book.decompress(data, sealed=self.encrypt)
            except LookupError as exc:
                raise MissingDictionaryError(
                    f"{self.where(key)}: the value was compressed with zstd dictionary {exc.args[0]}, which this "
                    "store's _ls_dicts table does not hold (a copy made without it?); copy _ls_dicts from the source store"
                ) from None
            except CodecError as exc:
                raise CodecError(
                    f"{self.where(key)}: {exc}; restore the row from a backup (store.backup) or a sync"
                ) from None
        try:
            value = self.from_bytes(data)
            return value if self.field_decode is None else self.field_decode(value)
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CodecError(f"{self.where(key)}: the decoded value is damaged ({exc})") from None
        except CorruptStoreError as exc:  # a damaged Array header: name the field and row, as above
            raise CodecError(f"{self.where(key)}: {exc}") from None

    # -- blind index -------------------------------------------------------------------

    def blind_condition(self, column: str, condition: Any) -> tuple[str, list[Any]]:
        """SQL matching rows whose value equals one of the given ones, through blind-index tags."""
        tests = condition if isinstance(condition, dict) else {"=": condition}
        clauses: list[str] = []
        params: list[Any] = []
        for op, value in tests.items():
            op = op.lower() if isinstance(op, str) else op
            if op in ("=", "=="):
                values = [value]
            elif op == "in":
                if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                    raise QueryError(f"{self.collection}.{self.name}: 'in' takes a list of values, got {value!r}")
                values = list(value)
            else:
                raise QueryError(
                    f"{self.collection}.{self.name}: an encrypted field can only be matched with = or 'in' "
                    f"(through its blind index), not {op!r}"
                )
            if any(v is None for v in values):
                if op != "in" and len(values) == 1:
                    clauses.append(f"{column} IS NULL")
                    continue
                raise QueryError(f"{self.collection}.{self.name}: None cannot be in an 'in' list; use = None")
            sql, ps = self._match(column, values)
            clauses.append(sql)
            params += ps
        return " AND ".join(clauses), params

    def _match(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        plains = []
        for v in values:
            try:
                plains.append(self.to_bytes(self.field.encode(v)))
            except (ValidationError, UnicodeEncodeError) as exc:
                raise QueryError(f"in where: {exc}") from None

        def tags() -> list[bytes]:
            keys = self.keys
            keys.refresh()
            if self.subject is None:
                index_keys = [keys.blind_key(self.label, None, False)]
            else:
                index_keys = []
                for kid in keys.live_subject_ids():
                    try:
                        index_keys.append(keys.blind_key(self.label, kid, False))
                    except LookupError:
                        continue  # a backup opened without keys_from: those subjects cannot be matched
            return [b"\xe2" + crypto.blind_tag(k, p) for k in index_keys if k is not None for p in plains]

        try:
            prefixes = sorted(set(self.store._run(lambda db: tags(), f"matching {self.collection}.{self.name}")))
        except MissingKeyError as exc:
            raise MissingKeyError(f"collection {self.collection!r}, field {self.name!r}: {exc}") from None
        if not prefixes:
            return "0", []
        if len(prefixes) <= DEFAULT_MAX_RANGE_TAGS:
            parts, params = [], []
            for p in prefixes:
                upper = crypto.next_prefix(p)
                parts.append(f"({column} >= ? AND {column} < ?)")
                params += [p, upper]
            return "(" + " OR ".join(parts) + ")", params
        return (
            f"substr({column}, 1, {len(prefixes[0])}) IN (SELECT unhex(value) FROM json_each(?))",
            [json.dumps([p.hex() for p in prefixes])],
        )


class RowCodec:
    """Decodes whole rows of a collection that has codec fields; all fields or an error, never part of a row."""

    def __init__(self, coll: Collection, order: list[tuple[str, Field]]) -> None:
        store = coll.store
        self.store = store
        self.key = coll.key
        self.fields: dict[str, FieldCodec] = {}
        for name, field in order:
            if uses_codec(field):
                self.fields[name] = FieldCodec(coll, field, store._dicts, store._keys)
                field.codec = self.fields[name]
        self.plan = [
            (name, self.fields.get(name), field.decode if type(field).decode is not Field.decode else None)
            for name, field in order
        ]
        self.subjects = any(c.encrypt for c in self.fields.values())
        #: The fields some codec field takes its subject (its encryption key) from, sorted.
        self.subject_fields = tuple(sorted({c.subject for c in self.fields.values() if c.subject}))

    def encoder(self, name: str) -> Callable[[Any, Any, dict[str, Any]], bytes]:
        """The function the generated row encoder calls for one codec field."""
        codec = self.fields[name]
        return codec.fast_encoder() or codec.encode

    def begin_read(self) -> None:
        """Before a read: notice keys forgotten or re-wrapped by another connection."""
        if self.subjects:
            self.store._run(lambda db: self.store._keys.refresh(), "checking keys")

    def decode_row(self, stored: Any) -> dict[str, Any]:
        """Decode one row as selected (key first, then fields in declaration order)."""
        key = stored[0]
        out: dict[str, Any] = {}
        for (name, codec, dec), value in zip(self.plan, stored):
            if value is None:
                out[name] = None
            elif codec is not None:
                out[name] = codec.decode(value, key)
            elif dec is not None:
                out[name] = dec(value)
            else:
                out[name] = value
        return out

    def decode_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Decode a change-log payload (stored values by field name)."""
        self.begin_read()
        row = self.decode_row([payload.get(name) for name, _, _ in self.plan])
        return {name: value for name, value in row.items() if name in payload}


def reencrypt(store: Any, batch: int) -> int:
    """Rewrite every row whose encrypted non-subject values are not under a new data key; return the count."""
    keys: KeyRing = store._keys
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    with store.transaction():
        newest = keys.new_data_key()
    rewritten = 0
    for name in store.collections():
        coll = store.collection(name)
        targets = [n for n, c in (coll._codec.fields.items() if coll._codec else []) if c.encrypt and c.subject is None]
        if not targets:
            continue
        last: Any = None
        key = quote(coll.key)
        columns = ", ".join(quote(n) for n in targets)
        while True:
            sql = f"SELECT {key}, {columns} FROM {coll._schema.table}"
            sql += f" WHERE {key} > ? ORDER BY {key} LIMIT ?" if last is not None else f" ORDER BY {key} LIMIT ?"
            params = (last, batch) if last is not None else (batch,)
            rows = store._run(lambda db, sql=sql, params=params: db.execute(sql, params).fetchall(), f"re-encrypting {name!r}")
            if not rows:
                break
            last = rows[-1][0]
            stale = [r[0] for r in rows if any(v is not None and crypto.key_id_of(v) != newest for v in r[1:])]
            if stale:
                rewritten += _rewrite(store, coll, stale)
    return rewritten


def _rewrite(store: Any, coll: Any, keys: list[Any]) -> int:
    """Read these rows and put them back in one transaction (in the current forms); return how many.

    Rows holding a value of a forgotten subject are left alone: putting one back would
    need the value that is gone.
    """
    with store.transaction():
        fresh = [row for row in coll.get_many(keys) if row is not None]
        fresh = [row for row in fresh if not any(v is FORGOTTEN for v in row.values())]
        coll.put_many(fresh)
    return len(fresh)


def rewrite_unchecked(store: Any, batch: int) -> int:
    """Rewrite every row holding a compressed value in a form without checksums; return the count.

    Unencrypted compressed values written before checksums came in are raw (0x00) or
    numbers (0x03) without a checksum over their header; they stay readable as they
    are, and a damaged byte in them can read back changed. Rewriting a row puts it in
    the checked forms (0x04, 0x05), in batches of ``batch`` rows per transaction, each
    rewritten row a new change-log record, as ``put_many`` would make.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    rewritten = 0
    for name in store.collections():
        coll = store.collection(name)
        targets = [n for n, c in (coll._codec.fields.items() if coll._codec else []) if c.compress and not c.encrypt]
        if not targets:
            continue
        older = " OR ".join(f"substr({quote(n)}, 1, 1) IN (x'00', x'03')" for n in targets)
        key = quote(coll.key)
        last: Any = None
        while True:
            sql = f"SELECT {key} FROM {coll._schema.table} WHERE ({older})"
            sql += f" AND {key} > ? ORDER BY {key} LIMIT ?" if last is not None else f" ORDER BY {key} LIMIT ?"
            params = (last, batch) if last is not None else (batch,)
            found = store._run(lambda db, sql=sql, params=params: db.execute(sql, params).fetchall(),
                               f"finding older compressed values in {name!r}")
            keys = [r[0] for r in found]
            if not keys:
                break
            last = keys[-1]
            rewritten += _rewrite(store, coll, keys)
    return rewritten


def damaged_values(store: Any, limit: int = 100) -> list[str]:
    """Decode every compressed or encrypted value and name those that fail (for ``verify``), up to ``limit``.

    ``integrity_check`` sees SQLite's pages, not what a value holds; a value whose
    checksum or authentication tag fails is found only by decoding it. Encrypted
    fields are skipped when the store was opened without the key that unlocks them.
    """
    problems: list[str] = []
    for name in store.collections():
        coll = store.collection(name)
        codecs = list(coll._codec.fields.items()) if coll._codec else []
        if not codecs:
            continue
        coll._codec.begin_read()
        columns = ", ".join(quote(n) for n, _ in codecs)
        sql = f"SELECT {quote(coll.key)}, {columns} FROM {coll._schema.table}"
        rows = store._run(lambda db, sql=sql: db.execute(sql).fetchall(), f"checking the values of {name!r}")
        locked: set[str] = set()
        for key, *values in rows:
            for (field, codec), value in zip(codecs, values):
                if value is None or field in locked:
                    continue
                try:
                    codec.decode(value, key)
                except MissingKeyError:
                    locked.add(field)  # no key for it in this process: it cannot be checked, not damage
                except (CodecError, TamperedValueError, CorruptStoreError) as exc:
                    problems.append(str(exc))
                    if len(problems) >= limit:
                        return problems
    return problems
