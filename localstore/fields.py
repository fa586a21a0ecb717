"""Field types: what a collection's columns hold, how values are checked, stored and read back.

Each field type validates a Python value and turns it into what SQLite stores
(``encode``), and turns the stored value back (``decode``). Errors name the
collection and field, say what was expected and what was given.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from .errors import CorruptStoreError, NotYetSupportedError, SchemaError, ValidationError

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: Options accepted by every field type. The ones in ``_PENDING_OPTIONS`` are declared
#: now and implemented by later work; asking for them raises ``NotYetSupportedError``.
_PENDING_OPTIONS: tuple[str, ...] = ()

#: Vector metrics a ``Vector`` field may declare.
VECTOR_METRICS = ("cosine", "l2", "l1", "fisher_rao")

_MISSING: Any = object()
_LE_F32 = np.dtype("<f4")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class Field:
    """A column of a collection: a type plus options.

    Options (all keyword-only):
      index: keep a SQLite index on the column for fast ``find``.
      nullable: whether None (or a missing value) is allowed; default True.
      default: the value used when a row leaves the field out (JSON-representable).
      encrypt: AES-256-GCM per value (not on Vector); see docs/privacy.md.
      compress: zstd per value, trained dictionaries for unencrypted Text/Json/Blob.
      subject: with encrypt, the field naming whose key encrypts the value (``store.forget``).
      blind_index: with encrypt, equality lookups through a keyed HMAC tag.
      filter, fulltext: see the vector and full-text search options.
    """

    type_name: ClassVar[str] = "Field"
    sql_type: ClassVar[str] = ""
    #: Whether the column can be used in ``where`` and ``order_by``.
    comparable: ClassVar[bool] = True

    def __init__(
        self,
        *,
        index: bool = False,
        nullable: bool = True,
        default: Any = None,
        encrypt: bool = False,
        compress: bool = False,
        filter: bool = False,
        fulltext: bool = False,
        subject: str | None = None,
        blind_index: bool = False,
    ) -> None:
        self.name = ""
        self.collection = ""
        self.index = bool(index)
        self.nullable = bool(nullable)
        self.encrypt = bool(encrypt)
        self.compress = bool(compress)
        self.filter = bool(filter)
        self.fulltext = bool(fulltext)
        self.default = default
        #: encrypt=True: the field whose value names the subject whose key encrypts this one (see ``forget``).
        self.subject = subject
        #: encrypt=True: also keep a keyed-HMAC tag so ``find`` can match equal values.
        self.blind_index = bool(blind_index)
        #: Set per collection for encrypt/compress fields: the ``codecs.FieldCodec`` that encodes them.
        self.codec: Any = None

    # -- declaration --------------------------------------------------------------

    def bind(self, collection: str, name: str) -> Field:
        """Return a copy of this field attached to a collection under a name, with its options checked."""
        field = self._copy()
        field.collection, field.name = collection, name
        for option in _PENDING_OPTIONS:
            if getattr(field, option):
                raise NotYetSupportedError(
                    f"{collection}.{name}: the {option}=True option is declared but not implemented "
                    f"in this version of localstore; remove it for now"
                )
        _check_codec_options(field, collection, name)
        if field.filter and field.type_name not in ("Text", "Integer", "Real", "Boolean"):
            raise SchemaError(f"{collection}.{name}: filter=True works on Text, Integer, Real and Boolean fields only")
        if field.fulltext and field.type_name != "Text":
            raise SchemaError(f"{collection}.{name}: fulltext=True works on Text fields only")
        if field.fulltext and getattr(field, "encrypt", False):
            raise SchemaError(
                f"{collection}.{name}: an encrypted field cannot be full-text indexed (the index would hold its "
                "words in plaintext); drop fulltext=True or encrypt=True"
            )
        if field.default is not None:
            try:
                field.encode(field.default)
                json.dumps(field.default)
            except (ValidationError, TypeError, ValueError) as exc:
                raise SchemaError(
                    f"{collection}.{name}: default {field.default!r} is not a valid "
                    f"JSON-representable {field.type_name} value ({exc})"
                ) from None
        return field

    def _copy(self) -> Field:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def spec(self) -> dict[str, Any]:
        """Return the JSON-serialisable description kept in the store file."""
        out: dict[str, Any] = {"type": self.type_name}
        for option in ("index", "encrypt", "compress", "filter", "fulltext", "blind_index"):
            if getattr(self, option, False):
                out[option] = True
        if getattr(self, "subject", None) is not None:
            out["subject"] = self.subject
        if not self.nullable:
            out["nullable"] = False
        if self.default is not None:
            out["default"] = self.default
        out.update(self._extra_spec())
        return out

    def _extra_spec(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> Field:
        """Rebuild a field from the description kept in the store file."""
        spec = dict(spec)
        cls = FIELD_TYPES.get(spec.pop("type", ""))
        if cls is None:
            raise SchemaError(f"unknown field type in stored schema: {spec!r}")
        return cls._from_spec(spec)

    @classmethod
    def _from_spec(cls, spec: dict[str, Any]) -> Field:
        return cls(**spec)

    def incompatible_with(self, stored: Field) -> str | None:
        """Say why this declaration cannot replace the stored one, or return None if it can."""
        if self.spec_core() != stored.spec_core():
            return f"declared as {self.describe()}, but the store has {stored.describe()}"
        return None

    def spec_core(self) -> dict[str, Any]:
        """The parts of the spec that cannot change once data exists."""
        spec = self.spec()
        spec.pop("index", None)
        spec.pop("default", None)
        return spec

    def describe(self) -> str:
        """A short human description, such as ``Vector(64, metric='cosine', nullable=False)``."""
        spec = self.spec()
        kind = spec.pop("type")
        args = ", ".join(f"{k}={v!r}" for k, v in spec.items())
        return f"{kind}({args})"

    def __repr__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Field) and self.spec() == other.spec()

    __hash__ = None  # type: ignore[assignment]

    # -- values -------------------------------------------------------------------

    def _fail(self, expected: str, value: Any) -> ValidationError:
        where = f"{self.collection}.{self.name}" if self.name else self.type_name
        return ValidationError(f"{where}: expected {expected}, got {_describe(value)}")

    def encode(self, value: Any) -> Any:
        """Check a non-None Python value and return what SQLite stores."""
        raise NotImplementedError

    def decode(self, stored: Any) -> Any:
        """Turn a stored non-None value back into the Python value."""
        return stored


class Text(Field):
    """A unicode string (SQLite TEXT)."""

    type_name = "Text"
    sql_type = "TEXT"

    def encode(self, value: Any) -> Any:
        if type(value) is str or isinstance(value, str):
            return value
        raise self._fail("a str", value)


class Integer(Field):
    """A 64-bit signed integer (SQLite INTEGER)."""

    type_name = "Integer"
    sql_type = "INTEGER"

    def encode(self, value: Any) -> Any:
        if type(value) is int or (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))):
            value = int(value)
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            raise self._fail("an integer within 64 bits", value)
        raise self._fail("an int", value)


class Real(Field):
    """A 64-bit float (SQLite REAL). NaN is refused: SQLite would store it as NULL."""

    type_name = "Real"
    sql_type = "REAL"

    def encode(self, value: Any) -> Any:
        if type(value) is float or (
            isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        ):
            try:
                value = float(value)
            except OverflowError:
                raise self._fail("a number within float range", value) from None
            if value != value:  # noqa: PLR0124 - NaN, the one float unequal to itself
                raise self._fail("a number (NaN cannot be stored; use None)", value)
            return value
        raise self._fail("a float or int", value)


class Boolean(Field):
    """True or False, stored as SQLite INTEGER 0 or 1."""

    type_name = "Boolean"
    sql_type = "INTEGER"

    def encode(self, value: Any) -> Any:
        if isinstance(value, (bool, np.bool_)):
            return 1 if value else 0
        raise self._fail("a bool", value)

    def decode(self, stored: Any) -> Any:
        return bool(stored)


#: Json's encoder, made once: ``json.dumps`` with options builds a new encoder per call (a third of its time).
_JSON_TEXT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class Json(Field):
    """Any JSON-representable value (dict, list, str, number, bool), stored as compact JSON text."""

    type_name = "Json"
    sql_type = "TEXT"
    comparable = False

    def encode(self, value: Any) -> Any:
        try:
            return _JSON_TEXT(value)
        except (TypeError, ValueError) as exc:
            raise self._fail(f"a JSON-representable value ({exc})", value) from None

    def decode(self, stored: Any) -> Any:
        return json.loads(stored)


class Blob(Field):
    """Raw bytes (SQLite BLOB)."""

    type_name = "Blob"
    sql_type = "BLOB"
    comparable = False

    def encode(self, value: Any) -> Any:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise self._fail("bytes", value)


# Array layout: magic, version, header length, ASCII header "dtype|d0,d1,...", then the
# C-ordered data. The dtype string (e.g. "<f4") keeps byte order, so reads are exact.
_ARRAY_MAGIC = b"LSA\x01"
_ARRAY_HEAD = struct.Struct("<4sH")


class Array(Field):
    """A numpy array of any plain dtype and shape; dtype and shape come back exactly."""

    type_name = "Array"
    sql_type = "BLOB"
    comparable = False

    def encode(self, value: Any) -> Any:
        if not isinstance(value, np.ndarray):
            raise self._fail("a numpy.ndarray", value)
        if value.dtype.kind in "OV" or value.dtype.fields is not None:
            raise self._fail("an array of a plain dtype (not object or structured)", value)
        header = f"{value.dtype.str}|{','.join(map(str, value.shape))}".encode("ascii")
        return _ARRAY_HEAD.pack(_ARRAY_MAGIC, len(header)) + header + np.ascontiguousarray(value).tobytes()

    def decode(self, stored: Any) -> Any:
        return decode_array(stored)


#: What ``dtype.str`` looks like ("<f4", "|u1", "<M8[ns]"): byte order, kind, item size, unit.
_DTYPE_STR = re.compile(r"[<>|][a-zA-Z][0-9]+(\[[0-9]*[a-zA-Z]+\])?")


def array_dtype(header: bytes) -> np.dtype[Any]:
    """The dtype named by an Array header ("<f4|3,4"); ValueError unless ``Array.encode`` could have written it."""
    # rpartition: the dtype string itself may contain "|" (e.g. "|u1"); the shape never does.
    dtype_str = header.decode("ascii").rpartition("|")[0]
    if not _DTYPE_STR.fullmatch(dtype_str):
        raise ValueError(f"dtype {dtype_str!r} is not one Array.encode writes")
    try:
        dtype = np.dtype(dtype_str)
    except Exception:  # noqa: BLE001 - numpy's dtype parser raises TypeError, SyntaxError, ... on odd strings
        raise ValueError(f"dtype {dtype_str!r} is not understood") from None
    if dtype.kind in "OV" or dtype.str != dtype_str:
        raise ValueError(f"dtype {dtype_str!r} is not a plain dtype in Array.encode's spelling")
    return dtype


def decode_array(stored: bytes) -> np.ndarray:
    """Turn bytes written by ``Array.encode`` back into a writable numpy array."""
    try:
        magic, length = _ARRAY_HEAD.unpack_from(stored)
        if magic != _ARRAY_MAGIC:
            raise ValueError("bad magic")
        start = _ARRAY_HEAD.size
        header = stored[start : start + length]
        if len(header) != length:
            raise ValueError("truncated header")
        dtype = array_dtype(header)
        shape_str = header.decode("ascii").rpartition("|")[2]
        parts = shape_str.split(",") if shape_str else []
        if not all(part.isdigit() for part in parts):
            raise ValueError(f"shape {shape_str!r} is not a list of sizes")
        shape = tuple(int(part) for part in parts)
        data = np.frombuffer(stored, dtype=dtype, offset=start + length)
        return data.reshape(shape).copy()
    except (ValueError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptStoreError(f"a stored array is damaged ({exc}); run store.verify() and restore from a backup") from None


class Vector(Field):
    """A fixed-size float32 vector (e.g. a basin coordinate or an embedding).

    Accepts any 1-D sequence of finite numbers of length ``dim``; stores it as
    float32 little-endian, the layout sqlite-vec reads; returns a numpy float32 array.
    """

    type_name = "Vector"
    sql_type = "BLOB"
    comparable = False

    def __init__(self, dim: int, metric: str = "cosine", quantize: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 8192:
            raise SchemaError(f"Vector dim must be an int between 1 and 8192, got {dim!r}")
        if metric not in VECTOR_METRICS:
            raise SchemaError(f"Vector metric must be one of {', '.join(VECTOR_METRICS)}; got {metric!r}")
        if quantize not in (None, "int8"):
            # Binary quantization was measured at recall@10 0.49 on isotropic data even with 64x
            # oversampling: below the 0.95 floor every approximate path must keep, so it is not offered.
            raise SchemaError(f"Vector quantize must be None or 'int8'; got {quantize!r}")
        self.dim = dim
        self.metric = metric
        self.quantize = quantize

    def _extra_spec(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"dim": self.dim, "metric": self.metric}
        if self.quantize:
            extra["quantize"] = self.quantize
        return extra

    @classmethod
    def _from_spec(cls, spec: dict[str, Any]) -> Field:
        return cls(spec.pop("dim"), spec.pop("metric", "cosine"), spec.pop("quantize", None), **spec)

    def as_float32(self, value: Any) -> np.ndarray:
        """Validate a vector and return it as a 1-D float32 array of ``dim`` finite values."""
        if type(value) is np.ndarray and value.dtype == _LE_F32 and value.shape == (self.dim,):
            # The common case (a float32 embedding) skips the conversions below.
            if not np.isfinite(value).all():
                raise self._fail("finite values (NaN or inf found)", value)
            return value
        if isinstance(value, (str, bytes)) or value is None:
            raise self._fail(f"a sequence of {self.dim} numbers", value)
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            raise self._fail(f"a sequence of {self.dim} numbers", value) from None
        if array.dtype.kind not in "iuf":
            raise self._fail(f"{self.dim} real numbers (dtype {array.dtype} cannot be cast safely)", value)
        if array.ndim != 1:
            raise self._fail(f"a 1-D vector of {self.dim} numbers, not shape {array.shape}", value)
        if array.shape[0] != self.dim:
            raise self._fail(f"a vector of dimension {self.dim}, not {array.shape[0]}", value)
        with np.errstate(over="ignore"):
            out = array.astype("<f4", copy=False)
        if not np.isfinite(out).all():
            raise self._fail("finite values (NaN or inf found, or a value beyond float32 range)", value)
        return out

    def encode(self, value: Any) -> Any:
        array = self.as_float32(value)
        if self.metric == "fisher_rao":
            from .vectors import normalise_probability

            array = normalise_probability(self, array)
        return array.tobytes()

    def decode(self, stored: Any) -> Any:
        return np.frombuffer(stored, dtype="<f4").copy()


def _check_codec_options(field: Field, collection: str, name: str) -> None:
    """Check encrypt/compress/subject/blind_index, and give such a field a BLOB column that cannot be ordered."""
    where = f"{collection}.{name}"
    subject, blind = getattr(field, "subject", None), getattr(field, "blind_index", False)
    if not field.encrypt:
        if subject is not None:
            raise SchemaError(f"{where}: subject= applies to encrypted fields; add encrypt=True")
        if blind:
            raise SchemaError(f"{where}: blind_index=True applies to encrypted fields; add encrypt=True")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise SchemaError(f"{where}: subject must be the name of another field, got {subject!r}")
    if not (field.encrypt or field.compress):
        return
    options = "encrypt=True" if field.encrypt else "compress=True"
    if isinstance(field, Vector):
        raise SchemaError(
            f"{where}: a Vector field feeds the vector index and cannot take {options}; keep the "
            "vector in an Array field (which can) if it must be encrypted or compressed"
        )
    if field.filter or field.fulltext:
        raise SchemaError(f"{where}: {options} cannot be combined with filter=True or fulltext=True (the index would hold plaintext)")
    if field.default is not None:
        raise SchemaError(
            f"{where}: a field with {options} cannot have a default (the schema keeps defaults in the clear); "
            "supply the value in each row"
        )
    if field.index and not blind:
        raise SchemaError(
            f"{where}: index=True would order ciphertext or compressed bytes; "
            + ("use blind_index=True for equality lookups" if field.encrypt else "drop index=True")
        )
    field.index = blind
    field.sql_type = "BLOB"  # type: ignore[misc]
    field.comparable = False  # type: ignore[misc]


FIELD_TYPES: dict[str, type[Field]] = {
    cls.type_name: cls for cls in (Text, Integer, Real, Boolean, Json, Blob, Array, Vector)
}

#: Field types a collection key may have.
KEY_TYPES = (Text, Integer)


def raise_bad_text(collection: str, values: Iterable[tuple[Any, str, Any]]) -> None:
    """Raise ``ValidationError`` naming the first (key, field, value) whose text is not valid UTF-8 (a lone surrogate)."""
    for key, name, value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValidationError(
                    f"{collection}.{name}: expected valid unicode text, got a lone surrogate "
                    f"{exc.object[exc.start:exc.end]!r} in key {key!r}; nothing was written"
                ) from None
