"""How a field, described by its stored spec, becomes a Postgres column, and a stored value a column value.

Works from the JSON spec kept in the store (``Field.spec()``), so it follows new
options without importing field classes. Encrypted and compressed fields are
opaque bytes: Postgres gets the ciphertext or compressed bytes and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Converter = Callable[[Any], Any]

#: Postgres types of the plain field types.
PLAIN_TYPES = {
    "Text": "text",
    "Integer": "bigint",
    "Real": "double precision",
    "Boolean": "boolean",
    "Json": "jsonb",
    "Blob": "bytea",
    "Array": "bytea",
}

#: pgvector operator classes for an HNSW index, by the field's metric; metrics missing here get no index.
HNSW_OPS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "l1": "vector_l1_ops"}

#: pgvector's HNSW index accepts ``vector`` columns up to this many dimensions.
HNSW_MAX_DIM = 2000


def is_opaque(spec: dict[str, Any]) -> bool:
    """Whether the stored value is opaque bytes (encrypted or compressed) rather than the plain encoding."""
    return bool(spec.get("encrypt") or spec.get("compress"))


def pg_type(spec: dict[str, Any], have_vector: bool) -> str:
    """The Postgres column type for a field spec."""
    if is_opaque(spec):
        return "bytea"
    kind = spec.get("type", "")
    if kind == "Vector":
        dim = int(spec["dim"])
        return f"vector({dim})" if have_vector else "real[]"
    return PLAIN_TYPES.get(kind, "bytea")


def _identity(value: Any) -> Any:
    return value


def text_value(value: Any) -> Any:
    """Text for a Postgres text column: NUL, which Postgres text cannot hold, becomes U+FFFD.

    Only the queryable column is affected; the change log keeps the exact stored bytes.
    """
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _json_text(value: Any) -> Any:
    if type(value) is str and "\\u0000" in value:
        return value.replace("\\u0000", "\\ufffd")  # jsonb refuses the NUL escape
    return value


def _to_bool(value: Any) -> Any:
    return None if value is None else bool(value)


def _to_bytes(value: Any) -> Any:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def _vector_text(value: Any) -> Any:
    if value is None:
        return None
    floats = np.frombuffer(value, dtype="<f4").tolist()
    return "[" + ",".join(map(repr, floats)) + "]"


def _vector_array(value: Any) -> Any:
    if value is None:
        return None
    return "{" + ",".join(map(repr, np.frombuffer(value, dtype="<f4").tolist())) + "}"


def converter(spec: dict[str, Any], column_type: str) -> Converter:
    """A function from the stored value to the value COPY sends for a column of ``column_type``."""
    if column_type == "bytea":
        return _to_bytes
    if column_type.startswith("vector("):
        return _vector_text
    if column_type == "real[]":
        return _vector_array
    if column_type == "boolean":
        return _to_bool
    if column_type == "text":
        return text_value
    if column_type == "jsonb":
        return _json_text
    return _identity


#: Column types whose converter leaves all but rare values as they are: plain numbers, and text or
#: JSON unless it holds NUL (which Postgres refuses, so the shipper can skip the converter and retry).
PASSTHROUGH = frozenset({"text", "jsonb", "bigint", "double precision"})


def passthrough(column_type: str) -> bool:
    """Whether stored values can go to a ``column_type`` column unconverted (see ``PASSTHROUGH``)."""
    return column_type in PASSTHROUGH


@dataclass(frozen=True)
class Staging:
    """How a column is staged for binary COPY: the staging column type, psycopg's COPY type, the cast in the merge."""

    pg_type: str
    copy_type: str
    cast: str | None = None


_BINARY = {
    "text": Staging("text", "text"),
    "bigint": Staging("bigint", "int8"),
    "double precision": Staging("double precision", "float8"),
    "boolean": Staging("boolean", "bool"),
    "bytea": Staging("bytea", "bytea"),
}


def staging(column_type: str) -> Staging:
    """The staging of a field column: plain types copy in binary, the rest as text cast in the merge."""
    return _BINARY.get(column_type) or Staging("text", "text", column_type)


def compatible(spec: dict[str, Any], existing_type: str, have_vector: bool) -> bool:
    """Whether a field can be written to an existing column of ``existing_type``."""
    return _norm(pg_type(spec, have_vector)) == _norm(existing_type)


def _norm(pgtype: str) -> str:
    return pgtype.replace(" ", "").lower()
