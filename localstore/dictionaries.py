"""zstd compression of field values, with dictionaries trained per (collection, field) and kept in the store.

A compressed value (the column of a ``compress=True`` field, or the plaintext
that an ``encrypt=True, compress=True`` field then encrypts) starts with a flag::

    0x00  raw, unchecked: the bytes follow as they are. Written only inside an encrypted
          value (whose AES-GCM tag already covers every byte); read for older values too
    0x01  a zstd frame (level ``DEFAULT_LEVEL``, no dictionary)
    0x02  4-byte dictionary id (big-endian), then a zstd frame made with that dictionary
    0x03  numbers, older form (read only): 1-byte item size, 4-byte prefix length, the
          prefix (the array's dtype/shape header), a zstd frame of the byte-shuffled data
    0x04  raw, checked: the bytes as they are, then their CRC-32 (4 bytes, big-endian).
          What an unencrypted field stores when compressing would not pay
    0x05  numbers (Array, Vector): one zstd frame holding 1-byte item size, 4-byte prefix
          length, the prefix (the dtype/shape header) and the byte-shuffled data

What catches damage: a 0x04 value's CRC-32 (every burst of up to 32 bits, so every
single damaged byte, and almost all else); the content checksum of every zstd frame
(0x01, 0x02, 0x05; a 0x05 frame holds the array header too); and nothing but the
AES-GCM tag inside an encrypted value. The flag byte is the one part no checksum
covers: damaged into another flag, the bytes after it fail to decode, except into
0x00, which hands them back. Outside encryption, a 0x00 value that ends with the
CRC-32 of the rest is therefore refused as a damaged 0x04 one (an older value ends
so by chance once in 2^32). A 0x01/0x02/0x05 flag damaged into 0x00 hands back a zstd
frame: Array, Json, Text and number fields then fail to decode it (its magic number
is no array header and not UTF-8), a Blob field would not. The older 0x00 (outside
encryption) and 0x03 forms stay readable, without those guarantees; 0x03 values are
cross-checked (item size against dtype, header length) but a damaged dtype letter
of the same size (``<f4`` into ``<i4``) reads back wrong: rewrite such values
(``put`` them again) to move them to 0x05.

Values of ``DEFAULT_PROBE_BYTES`` or more are probed first: a sample of
``DEFAULT_PROBE_SAMPLE_BYTES`` spread over the value is compressed at a fast level,
and when it would not shrink by ``DEFAULT_MIN_SAVING``, the value is stored raw at
once (random-looking floats, already-compressed media) instead of paying for a
full compression that gains nothing.

Dictionaries live in ``_ls_dicts`` (layout below), are never updated or deleted
(triggers refuse it), and are read back by id, so every value stays decodable
after retraining, in any process, and in backups. No dictionary is trained on an
encrypted field: a dictionary holds sample bytes in the clear.

    _ls_dicts(id INTEGER PRIMARY KEY,  -- zstd dictionary id, random in 32768 .. 2^31-1 (outside zstd's reserved ranges)
              coll TEXT, field TEXT,   -- the (collection, field) it was trained on
              created_hlc INTEGER,     -- when (hybrid logical clock of the store)
              size INTEGER,            -- bytes of the dictionary
              samples INTEGER, sample_bytes INTEGER,
              ratio REAL,              -- compression ratio on held-out samples at training
              level INTEGER,           -- zstd level used with it
              dict BLOB)               -- the dictionary itself (zstd format, its id inside)
"""

from __future__ import annotations

import secrets
import struct
import threading
import zlib
from typing import TYPE_CHECKING, Any

import zstandard as zstd

from . import clock
from ._sqlite import boundary, created_row_state
from .errors import CodecError

if TYPE_CHECKING:
    from .store import Store

#: zstd level for every compressed value: level 3 compresses 450-byte records with a
#: trained dictionary at about 250k values/s on one core; higher levels gain little on short values.
DEFAULT_LEVEL = 3

#: The largest dictionary trained, in bytes (zstd's advice: samples about 100x this).
DEFAULT_DICT_BYTES = 112 * 1024

#: The smallest dictionary trained, in bytes; training starts once 100x this many
#: bytes of samples exist for the field (about 400 KB).
DEFAULT_MIN_DICT_BYTES = 4 * 1024

#: Bytes written to a field between two checks for (re)training. The first write
#: of each process checks too, so stores written a little at a time are trained as well.
DEFAULT_CHECK_BYTES = 256 * 1024

#: Retrain when the measured ratio falls below this share of the ratio measured at training.
DEFAULT_RETRAIN_SHARE = 0.8

#: Values shorter than this many bytes are stored raw without trying zstd.
DEFAULT_MIN_VALUE_BYTES = 24

#: Values of at least this many bytes are probed before being compressed (see the module
#: docstring); smaller ones are compressed outright, as probing would cost about as much.
#: 0 probes every value of ``DEFAULT_MIN_VALUE_BYTES`` or more.
DEFAULT_PROBE_BYTES = 16 * 1024

#: Bytes of a value compressed to probe it: four slices, at its start, end and in between.
DEFAULT_PROBE_SAMPLE_BYTES = 4 * 1024

#: Share of its size a probed sample must save for the value to be compressed (0.03 = 3%);
#: 0 compresses whatever shrinks at all, as for values below ``DEFAULT_PROBE_BYTES``.
DEFAULT_MIN_SAVING = 0.03

#: zstd level of the probe: level 1 entropy-codes literals as level 3 does (floats shrink
#: mostly through that), at a fraction of the cost; negative levels would not.
DEFAULT_PROBE_LEVEL = 1

FIRST_DICT_ID = 32768
LAST_DICT_ID = 2**31 - 1

DICTS_DDL = """
CREATE TABLE IF NOT EXISTS _ls_dicts(
    id INTEGER PRIMARY KEY,
    coll TEXT NOT NULL,
    field TEXT NOT NULL,
    created_hlc INTEGER NOT NULL,
    size INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    sample_bytes INTEGER NOT NULL,
    ratio REAL NOT NULL,
    level INTEGER NOT NULL,
    dict BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS _ls_dicts_field ON _ls_dicts(coll, field, created_hlc);
CREATE TRIGGER IF NOT EXISTS _ls_dicts_no_update BEFORE UPDATE ON _ls_dicts
BEGIN SELECT RAISE(ABORT, 'localstore dictionaries are immutable'); END;
CREATE TRIGGER IF NOT EXISTS _ls_dicts_no_delete BEFORE DELETE ON _ls_dicts
BEGIN SELECT RAISE(ABORT, 'localstore dictionaries are kept forever: values may still use them'); END;
"""

RAW, PLAIN, DICT, SHUFFLED, CHECKED, NUMBERS = 0, 1, 2, 3, 4, 5
_ID = struct.Struct(">I")
_SHUF = struct.Struct(">BI")
_CRC = struct.Struct(">I")


def checked_raw(data: bytes) -> bytes:
    """The 0x04 form of a value: flag, the bytes as they are, their CRC-32."""
    return b"".join((b"\x04", data, _CRC.pack(zlib.crc32(data))))  # one copy of a value that may be large


def _shuffle(body: bytes | memoryview, itemsize: int) -> bytes:
    """Byte-plane order (every item's first byte, then every second byte...): floats then compress."""
    import numpy as np

    return np.frombuffer(body, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(body: bytes, itemsize: int) -> bytes:
    import numpy as np

    if len(body) % itemsize:
        raise CodecError(f"damaged numbers value ({len(body)} bytes of data is not a whole number of {itemsize}-byte items)")
    return np.frombuffer(body, np.uint8).reshape(itemsize, -1).T.tobytes()


def _check_prefix(prefix: bytes, itemsize: int, body_bytes: int) -> None:
    """Cross-check an Array prefix against the item size and data it came with (a damaged header would misread)."""
    if not prefix:
        return
    from .fields import _ARRAY_HEAD, array_dtype

    try:
        _, length = _ARRAY_HEAD.unpack_from(prefix)
    except struct.error:
        raise CodecError("damaged array header (truncated)") from None
    if len(prefix) != _ARRAY_HEAD.size + length:
        raise CodecError(f"damaged array header (its length says {length} bytes, the value holds {len(prefix) - _ARRAY_HEAD.size})")
    try:
        dtype = array_dtype(prefix[_ARRAY_HEAD.size :])
    except ValueError as exc:
        raise CodecError(f"damaged array header ({exc})") from None
    expected = dtype.itemsize if dtype.itemsize > 1 and body_bytes else 1
    if itemsize != expected:
        raise CodecError(f"damaged numbers value (item size {itemsize}, but its array header says {dtype.str})")


def _compressor(dict_data: zstd.ZstdCompressionDict | None = None) -> zstd.ZstdCompressor:
    return zstd.ZstdCompressor(
        level=DEFAULT_LEVEL, dict_data=dict_data, write_checksum=True, write_content_size=True, write_dict_id=False
    )


class Dictionaries:
    """A store's zstd dictionaries: loaded by id on demand, cached, created by training."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.plain = _compressor()
        #: Compresses probe samples only (no frame extras: just its size is looked at).
        self.probe = zstd.ZstdCompressor(level=DEFAULT_PROBE_LEVEL, write_checksum=False, write_content_size=False)
        self._plain_d = zstd.ZstdDecompressor()
        self._by_id: dict[int, tuple[zstd.ZstdCompressor, zstd.ZstdDecompressor]] = {}
        self._lock = threading.Lock()
        #: Dictionaries this object inserted, id -> (transaction, depth), until seen committed.
        self._created: dict[int, tuple[Any, int]] = {}

    def _table(self) -> bool:
        db = self.store._db
        return db.execute("SELECT 1 FROM sqlite_schema WHERE name='_ls_dicts'").fetchone() is not None

    def latest(self, coll: str, field: str) -> tuple[int, int, float] | None:
        """The newest dictionary of a field as (id, size, ratio), or None."""
        if not self._table():
            return None
        row = self.store._db.execute(
            "SELECT id, size, ratio FROM _ls_dicts WHERE coll = ? AND field = ? ORDER BY created_hlc DESC, id DESC LIMIT 1", (coll, field)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), float(row[2]))

    def pair(self, dict_id: int) -> tuple[zstd.ZstdCompressor, zstd.ZstdDecompressor]:
        """The compressor and decompressor of one dictionary; LookupError if the store lacks it."""
        found = self._by_id.get(dict_id)
        if found is not None:
            return found
        # Read lazily, often while a row is decoded outside any other boundary: SQLite's
        # errors (a damaged page among them) must still reach the caller as localstore errors.
        with self.store._lock, boundary(self.store.path, "reading a compression dictionary"):
            row = None
            if self._table():
                row = self.store._db.execute("SELECT dict FROM _ls_dicts WHERE id = ?", (dict_id,)).fetchone()
        if row is None:
            raise LookupError(dict_id)
        data = zstd.ZstdCompressionDict(row[0])
        found = (_compressor(data), zstd.ZstdDecompressor(dict_data=data))
        self._by_id[dict_id] = found
        return found

    def still_there(self, dict_id: int) -> bool:
        """Whether a dictionary this object created survived (a rollback may have undone it)."""
        created = self._created.get(dict_id)
        if created is None:
            return True
        found, committed = created_row_state(self.store, created, "_ls_dicts", dict_id)
        if committed:
            del self._created[dict_id]
        if not found:
            self._created.pop(dict_id, None)
            self._by_id.pop(dict_id, None)
        return found

    def decompress(self, data: bytes, *, sealed: bool = False) -> bytes:
        """Undo ``FieldCompressor.compress``; LookupError names a missing dictionary id, CodecError damage.

        ``sealed``: the bytes come out of an authenticated decryption, so no check is needed on 0x00.
        """
        flag = data[0] if data else -1
        try:
            if flag == CHECKED:
                body = data[1:-4]
                if len(data) < 5 or zlib.crc32(body) != _CRC.unpack_from(data, len(data) - 4)[0]:
                    raise CodecError("the value fails its CRC-32 checksum (its bytes were altered)")
                return body
            if flag == RAW:
                if not sealed and len(data) >= 5 and zlib.crc32(data[1:-4]) == _CRC.unpack_from(data, len(data) - 4)[0]:
                    raise CodecError("the value's flag byte was damaged (a checked raw value now claims to be unchecked)")
                return data[1:]
            if flag == PLAIN:
                with self._lock:
                    out = bytes(self._plain_d.decompress(data[1:]))
            elif flag == DICT:
                (dict_id,) = _ID.unpack_from(data, 1)
                _, dec = self.pair(dict_id)
                with self._lock:
                    out = bytes(dec.decompress(data[5:]))
            elif flag == NUMBERS:
                with self._lock:
                    content = self._plain_d.decompress(data[1:])
                itemsize, prefix_len = _SHUF.unpack_from(content)
                start = _SHUF.size + prefix_len
                return self._numbers(content[_SHUF.size : start], content[start:], itemsize)
            elif flag == SHUFFLED:
                itemsize, prefix_len = _SHUF.unpack_from(data, 1)
                start = 1 + _SHUF.size
                with self._lock:
                    body = self._plain_d.decompress(data[start + prefix_len :])
                return self._numbers(data[start : start + prefix_len], body, itemsize)
            else:
                raise CodecError(f"unknown compression flag {flag}")
        except zstd.ZstdError as exc:
            raise CodecError(f"damaged zstd frame ({exc})") from None
        except struct.error:
            raise CodecError("truncated compressed value") from None
        except (MemoryError, OverflowError, ValueError):
            # A damaged frame header can claim an absurd content size (zstd then tries to allocate it).
            raise CodecError("damaged zstd frame header (impossible content size)") from None
        if not out:
            # No value is ever compressed empty; python-zstandard returns b"" for a header that
            # a flipped bit made claim a content size of 0, without reading the frame.
            raise CodecError("damaged zstd frame header (it claims no content)")
        return out

    @staticmethod
    def _numbers(prefix: bytes, body: bytes, itemsize: int) -> bytes:
        if itemsize < 1:
            raise CodecError("damaged numbers value (item size 0)")
        _check_prefix(prefix, itemsize, len(body))
        return bytes(prefix) + (_unshuffle(body, itemsize) if itemsize > 1 else bytes(body))

    def train(self, coll: str, field: str, samples: list[bytes]) -> tuple[int, int, float] | None:
        """Train a dictionary on samples (inside a write transaction) and store it; None if it does not help."""
        held = samples[::10]
        train = [s for i, s in enumerate(samples) if i % 10]
        total = sum(map(len, train))
        size = max(DEFAULT_MIN_DICT_BYTES, min(DEFAULT_DICT_BYTES, total // 100))
        db = self.store._db
        db.execute(DICTS_DDL)
        # Random ids: unique in this store, and unlikely to meet another store's when rows and
        # dictionaries of several stores end up side by side (a replica, a central copy).
        while True:
            dict_id = FIRST_DICT_ID + secrets.randbelow(LAST_DICT_ID - FIRST_DICT_ID + 1)
            if db.execute("SELECT 1 FROM _ls_dicts WHERE id = ?", (dict_id,)).fetchone() is None:
                break
        try:
            trained = zstd.train_dictionary(size, list[Any](train), dict_id=dict_id, level=DEFAULT_LEVEL)
        except zstd.ZstdError:
            return None  # too few or too uniform samples; try again with more data
        comp = _compressor(trained)
        raw = sum(map(len, held)) or 1
        with_dict = sum(min(len(comp.compress(s)) + 5, len(s) + 1) for s in held) or 1
        plain = sum(min(len(self.plain.compress(s)) + 1, len(s) + 1) for s in held) or 1
        ratio = raw / with_dict
        if with_dict >= plain * 0.95:
            return None
        blob = trained.as_bytes()
        db.execute(
            "INSERT INTO _ls_dicts(id, coll, field, created_hlc, size, samples, sample_bytes, ratio, level, dict)"
            " VALUES(?,?,?,?,?,?,?,?,?,?)",
            (dict_id, coll, field, clock.wall_hlc(), len(blob), len(train), total, ratio, DEFAULT_LEVEL, blob),
        )
        self._created[dict_id] = (self.store._tx, self.store._depth)
        self._by_id[dict_id] = (comp, zstd.ZstdDecompressor(dict_data=trained))
        return dict_id, len(blob), ratio


class FieldCompressor:
    """Compresses one field's values; trains and retrains its dictionary as data accumulates."""

    def __init__(self, book: Dictionaries, coll: str, field: str, *, trainable: bool, itemsize: int | None,
                 samples: Any = None, checked: bool = True) -> None:
        self.book = book
        self.coll, self.field = coll, field
        self.trainable = trainable
        #: For numbers: the item size to byte-shuffle by (0 for an Array, read from its header).
        self.itemsize = itemsize
        #: Whether raw values carry a CRC-32 (0x04); False inside an encrypted value, whose tag covers them.
        self.checked = checked
        self._samples = samples  # callable returning recent stored values, newest first
        self._dict: tuple[int, int, float] | None = None
        self._loaded = False
        self._since_check = DEFAULT_CHECK_BYTES  # the first write of a process checks
        self._raw = self._packed = self._since_dict = 0
        self._next_try = 0
        #: Values of at least this many bytes are probed first (None: never, every value is compressed).
        self.probe_bytes: int | None = DEFAULT_PROBE_BYTES
        #: Values stored raw because their probe said compressing would not pay (for benchmarks and tests).
        self.probed_raw = 0

    def raw(self, data: bytes) -> bytes:
        """The raw form of a value: checked (0x04), or unchecked (0x00) inside an encrypted value."""
        return checked_raw(data) if self.checked else b"\x00" + data

    def compress(self, data: bytes) -> bytes:
        """The flagged, compressed form of one value (raw if zstd does not make it smaller)."""
        n = len(data)
        if self.itemsize is not None:
            return self._shuffled(data)
        if n < DEFAULT_MIN_VALUE_BYTES:
            return self.raw(data)
        if self.probe_bytes is not None and n >= self.probe_bytes and not self.worth_compressing(data, 1):
            return self.raw(data)
        if self.trainable:
            if not self._loaded:
                self._dict, self._loaded = self.book.latest(self.coll, self.field), True
            self._since_check += n
            if self._since_check >= DEFAULT_CHECK_BYTES:
                self._check()
            current = self._dict
            if current is not None and self.book.still_there(current[0]):
                comp, _ = self.book.pair(current[0])
                frame = comp.compress(data)
                self._raw += n
                self._since_dict += n
                if len(frame) + 4 < n:
                    self._packed += len(frame) + 5
                    return b"\x02" + _ID.pack(current[0]) + frame
                self._packed += n + 1
                return self.raw(data)
            if current is not None:
                self._dict = None  # its transaction was rolled back
        frame = self.book.plain.compress(data)
        return b"\x01" + frame if len(frame) < n else self.raw(data)

    def worth_compressing(self, body: bytes | memoryview, itemsize: int) -> bool:
        """Whether a sample of ``body`` shrinks by ``DEFAULT_MIN_SAVING`` at the probe's level.

        The sample is four slices of whole items (at the start, the end and in between), so
        a value whose parts differ is judged on all of them; numbers are shuffled as they
        would be. It errs towards compressing: a value that is all alike in one place is kept.
        """
        piece = DEFAULT_PROBE_SAMPLE_BYTES // 4 // itemsize * itemsize
        if piece == 0 or len(body) < 4 * piece:
            return True
        last = (len(body) - piece) // itemsize
        offsets = [i * last // 3 * itemsize for i in range(4)]
        sample = b"".join(body[at : at + piece] for at in offsets)
        if itemsize > 1:
            sample = _shuffle(sample, itemsize)
        if len(self.book.probe.compress(sample)) <= len(sample) * (1 - DEFAULT_MIN_SAVING):
            return True
        self.probed_raw += 1
        return False

    def _shuffled(self, data: bytes) -> bytes:
        prefix, itemsize = b"", self.itemsize or 1
        body: bytes | memoryview = data
        if self.itemsize == 0:  # an Array: keep its dtype/shape header, shuffle the data by item size
            from .fields import _ARRAY_HEAD, array_dtype

            _, length = _ARRAY_HEAD.unpack_from(data)
            cut = _ARRAY_HEAD.size + length
            prefix, body = data[:cut], memoryview(data)[cut:]  # a view: a raw value is never copied twice
            itemsize = array_dtype(data[_ARRAY_HEAD.size : cut]).itemsize
        if not (itemsize > 1 and len(body) % itemsize == 0 and body):
            itemsize = 1
        if self.probe_bytes is not None and len(data) >= self.probe_bytes and not self.worth_compressing(body, itemsize):
            return self.raw(data)
        if itemsize > 1:
            body = _shuffle(body, itemsize)
        # One frame holds the header too, so zstd's content checksum covers every byte.
        frame = self.book.plain.compress(b"".join((_SHUF.pack(itemsize, len(prefix)), prefix, body)))
        return b"\x05" + frame if len(frame) < len(data) else self.raw(data)

    def _check(self) -> None:
        """Train a first dictionary, a larger one as data grows, or a new one when the ratio drops."""
        self._since_check = 0
        current = self._dict
        if current is not None:
            measured = self._raw / self._packed if self._packed else None
            dropped = measured is not None and self._raw >= DEFAULT_CHECK_BYTES and measured < DEFAULT_RETRAIN_SHARE * current[2]
            grow = current[1] < DEFAULT_DICT_BYTES * 0.9 and self._since_dict >= 400 * current[1]
            self._raw = self._packed = 0
            if not (dropped or grow):
                return
        if self._samples is None:
            return
        samples = self._samples(100 * DEFAULT_DICT_BYTES)
        total = sum(map(len, samples))
        if total < max(100 * DEFAULT_MIN_DICT_BYTES, self._next_try):
            return
        made = self.book.train(self.coll, self.field, samples)
        if made is None:
            self._next_try = total * 2  # did not help: wait for twice the data
            return
        self._dict, self._since_dict = made, 0
