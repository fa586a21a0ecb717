"""Field types: every value a field accepts comes back from the store exactly as it went in."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localstore as ls


def _roundtrip(store: ls.Store, field: ls.Field, value: Any) -> Any:
    """Store ``value`` in a one-field collection and read it back (from a fresh store, so from disk)."""
    coll = store.collection("things", key="k", fields={"k": ls.Text(), "v": field})
    coll.put({"k": "row", "v": value})
    path = store.path
    with ls.open(path) as again:
        row = again.collection("things").get("row")
    assert row is not None
    return row["v"]


# -- Text -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["plain", "", "é ü ß 中文 русский", "😀🚀👩‍👩‍👧", "with\nnewline\ttab", "nul\x00inside", "x" * 100_000],
    ids=["plain", "empty", "unicode", "emoji", "whitespace", "nul", "long"],
)
def test_text_round_trip(store: ls.Store, value: str) -> None:
    got = _roundtrip(store, ls.Text(), value)
    assert got == value
    assert type(got) is str


def test_text_empty_string_is_not_none(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Text()})
    coll.put({"k": "a", "v": ""})
    coll.put({"k": "b", "v": None})
    assert coll.get("a") == {"k": "a", "v": ""}
    assert coll.get("b") == {"k": "b", "v": None}
    assert [r["k"] for r in coll.find(where={"v": None})] == ["b"]


def test_text_emoji_key(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    coll.put({"k": "🔑é", "v": 1})
    assert coll.get("🔑é") == {"k": "🔑é", "v": 1}
    assert coll.keys() == ["🔑é"]


def test_text_lone_surrogate_is_validation_error(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Text()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": "\ud800"})
    assert coll.count() == 0
    coll.put({"k": "a", "v": "fine"})
    bad = "a\ud800"
    for call in (lambda: coll.get(bad), lambda: coll.get_many([bad]), lambda: coll.delete(bad),
                 lambda: coll.update(bad, {"v": "x"}), lambda: coll.put({"k": bad, "v": "x"})):
        with pytest.raises(ls.ValidationError, match=r"t\.k: .*lone surrogate"):
            call()
    assert coll.find() == [{"k": "a", "v": "fine"}]


# -- Integer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)],
    ids=["zero", "one", "minus-one", "2^31", "2^53+1", "int64-max", "int64-min"],
)
def test_integer_round_trip(store: ls.Store, value: int) -> None:
    got = _roundtrip(store, ls.Integer(), value)
    assert got == value
    assert type(got) is int


@pytest.mark.parametrize(
    "value",
    [np.int8(-7), np.int16(300), np.int32(-(2**31)), np.int64(2**63 - 1), np.uint8(255), np.uint32(2**32 - 1),
     np.uint64(2**63 - 1)],
    ids=lambda v: f"{type(v).__name__}({v})",
)
def test_integer_accepts_numpy_ints(store: ls.Store, value: np.integer[Any]) -> None:
    got = _roundtrip(store, ls.Integer(), value)
    assert got == int(value)
    assert type(got) is int


@pytest.mark.parametrize("value", [np.uint64(2**64 - 1), np.uint64(2**63)], ids=["uint64-max", "uint64-2^63"])
def test_integer_numpy_beyond_64_bits_is_refused(store: ls.Store, value: np.integer[Any]) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30], ids=["int64-max+1", "int64-min-1", "10^30"])
def test_integer_python_int_beyond_64_bits_is_validation_error(store: ls.Store, value: int) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


@pytest.mark.parametrize("value", [True, False, 1.0, "1", np.bool_(True), [1]], ids=repr)
def test_integer_refuses_non_integers(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


# -- Real ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0.0, 0.1, -2.5, 1e308, 5e-324, float("inf"), float("-inf"), 1 / 3],
    ids=["zero", "tenth", "negative", "huge", "subnormal", "inf", "-inf", "third"],
)
def test_real_round_trip(store: ls.Store, value: float) -> None:
    got = _roundtrip(store, ls.Real(), value)
    assert got == value
    assert type(got) is float


@pytest.mark.parametrize(
    "value",
    [np.float64(0.1), np.float32(0.1), np.float16(1.5), np.float64("inf"), np.int64(3), 7],
    ids=["float64", "float32", "float16", "float64-inf", "np-int64", "python-int"],
)
def test_real_accepts_numpy_numbers_and_ints(store: ls.Store, value: Any) -> None:
    got = _roundtrip(store, ls.Real(), value)
    assert got == float(value)
    assert type(got) is float


@pytest.mark.parametrize("value", [float("nan"), np.float64("nan"), np.float32("nan")], ids=["nan", "np64-nan", "np32-nan"])
def test_real_refuses_nan(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Real()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


@pytest.mark.parametrize("value", [True, np.bool_(False), "1.0", b"1", [1.0]], ids=["bool", "np-bool", "str", "bytes", "list"])
def test_real_refuses_non_numbers(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Real()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})


def test_real_huge_int_is_validation_error(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Real()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": 10**400})


# -- Boolean ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)], ids=repr)
def test_boolean_round_trip(store: ls.Store, value: Any) -> None:
    got = _roundtrip(store, ls.Boolean(), value)
    assert got is bool(value)


@pytest.mark.parametrize("value", [0, 1, "true", 1.0], ids=repr)
def test_boolean_refuses_non_bools(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Boolean()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})


def test_boolean_false_is_findable(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Boolean()})
    coll.put_many([{"k": "a", "v": True}, {"k": "b", "v": False}, {"k": "c", "v": None}])
    assert [r["k"] for r in coll.find(where={"v": False})] == ["b"]
    assert [r["k"] for r in coll.find(where={"v": True})] == ["a"]


# -- Json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"a": {"b": {"c": [1, 2, {"d": None}]}}, "e": "ü😀", "f": True, "g": 1.5, "h": -(2**62)},
        [[], {}, [[[]]], "", 0],
        "just a string",
        42,
        0.25,
        True,
        False,
        [],
        {},
    ],
    ids=["nested", "empties", "str", "int", "float", "true", "false", "empty-list", "empty-dict"],
)
def test_json_round_trip(store: ls.Store, value: Any) -> None:
    got = _roundtrip(store, ls.Json(), value)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("value", [{"x": float("nan")}, {"x": object()}, {1, 2}, b"bytes"], ids=["nan", "object", "set", "bytes"])
def test_json_refuses_unrepresentable(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Json()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})


# -- Blob ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00", b"\x00\xff" * 1000, bytes(range(256))],
    ids=["empty", "nul", "binary", "all-bytes"],
)
def test_blob_round_trip(store: ls.Store, value: bytes) -> None:
    got = _roundtrip(store, ls.Blob(), value)
    assert got == value
    assert type(got) is bytes


def test_blob_empty_bytes_is_not_none(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Blob()})
    coll.put({"k": "a", "v": b""})
    row = coll.get("a")
    assert row is not None and row["v"] == b"" and row["v"] is not None


@pytest.mark.parametrize("value", [bytearray(b"abc"), memoryview(b"abc")], ids=["bytearray", "memoryview"])
def test_blob_accepts_bytes_like(store: ls.Store, value: Any) -> None:
    got = _roundtrip(store, ls.Blob(), value)
    assert got == b"abc"
    assert type(got) is bytes


@pytest.mark.parametrize("value", ["text", 1, [1, 2]], ids=repr)
def test_blob_refuses_non_bytes(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Blob()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})


# -- Array -------------------------------------------------------------------------------------------------

def _arrays() -> list[Any]:
    rng = np.random.default_rng(7)
    cases = {
        "float32-1d": rng.standard_normal(17).astype(np.float32),
        "float64-3d": rng.standard_normal((2, 3, 4)),
        "int64-1d": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
        "uint16-2d": np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000,
        "complex64-1d": np.array([1 + 2j, -3.5j, 0], dtype=np.complex64),
        "datetime64-1d": np.array(["2020-01-01T00:00:01", "1969-12-31T23:59:59"], dtype="datetime64[s]"),
        "datetime64ns-0d": np.array(np.datetime64("2024-02-29T12:00:00.123456789", "ns")),
        "float64-0d": np.array(3.5),
        "float64-empty": np.zeros((0,)),
        "float32-empty-3d": np.zeros((2, 0, 3), dtype=np.float32),
        "bigendian-float32-3d": np.arange(24, dtype=">f4").reshape(2, 3, 4),
        "fortran-order": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "strided-view": np.arange(20, dtype=np.float64)[::3],
        "unicode": np.array(["a", "\u00fc\U0001F600"], dtype="<U4"),
        # Single-byte dtypes: dtype.str starts with "|" ("|i1", "|b1"), the header's separator.
        "int8-1d": np.array([-128, 0, 127], dtype=np.int8),
        "int8-3d": np.arange(24, dtype=np.int8).reshape(2, 3, 4),
        "bool-1d": np.array([True, False, True]),
        "uint8-0d": np.array(200, dtype=np.uint8),
        "bytes-S3": np.array([b"abc", b"d"], dtype="S3"),
    }
    return [pytest.param(v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("case", _arrays())
def test_array_round_trip_keeps_dtype_shape_and_values(store: ls.Store, case: np.ndarray) -> None:
    value = case
    got = _roundtrip(store, ls.Array(), value)
    assert isinstance(got, np.ndarray)
    assert got.dtype == value.dtype
    assert got.dtype.str == value.dtype.str  # byte order kept too
    assert got.shape == value.shape
    assert np.array_equal(got, value)
    assert got.flags.writeable


def test_array_read_back_is_independent_copy(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Array()})
    coll.put({"k": "a", "v": np.arange(4.0)})
    first = coll.get("a")
    assert first is not None
    first["v"][0] = 99.0
    again = coll.get("a")
    assert again is not None and again["v"][0] == 0.0


@pytest.mark.parametrize(
    "value",
    [[1, 2, 3], np.array([object()], dtype=object), np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), b"raw"],
    ids=["list", "object-dtype", "structured", "bytes"],
)
def test_array_refuses_non_plain_arrays(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Array()})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


# -- Vector ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[0.5, -1.0, 2.0, 0.0], (0.5, -1.0, 2.0, 0.0), np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float64),
     np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32), [1, -2, 3, 0]],
    ids=["list", "tuple", "numpy-float64", "numpy-float32", "ints"],
)
def test_vector_round_trip(store: ls.Store, value: Any) -> None:
    got = _roundtrip(store, ls.Vector(4), value)
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.float32
    assert got.shape == (4,)
    assert np.array_equal(got, np.asarray(value, dtype=np.float32))


def test_vector_float64_is_rounded_to_float32(store: ls.Store) -> None:
    got = _roundtrip(store, ls.Vector(2), np.array([0.1, 1 / 3], dtype=np.float64))
    assert got.tolist() == np.array([0.1, 1 / 3], dtype=np.float32).tolist()


@pytest.mark.parametrize(
    "value",
    [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0], [[1.0, 2.0], [3.0, 4.0]], [1.0, float("nan"), 0, 0],
     [1.0, float("inf"), 0, 0], [1e300, 0, 0, 0], ["a", "b", "c", "d"], "abcd", 5],
    ids=["too-short", "too-long", "2d", "nan", "inf", "beyond-float32", "strings", "str", "scalar"],
)
def test_vector_refuses_bad_values(store: ls.Store, value: Any) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "v": ls.Vector(4)})
    with pytest.raises(ls.ValidationError, match=r"t\.v"):
        coll.put({"k": "a", "v": value})
    assert coll.count() == 0


@pytest.mark.parametrize("dim", [0, -1, 8193, 2.0, True, "4"], ids=repr)
def test_vector_bad_dim_is_schema_error(dim: Any) -> None:
    with pytest.raises(ls.SchemaError):
        ls.Vector(dim)


def test_vector_bad_metric_is_schema_error() -> None:
    with pytest.raises(ls.SchemaError, match="metric"):
        ls.Vector(4, metric="dot")


# -- None, defaults, nullable ------------------------------------------------------------------------------------

_ALL_TYPES: dict[str, ls.Field] = {
    "text": ls.Text(),
    "integer": ls.Integer(),
    "real": ls.Real(),
    "boolean": ls.Boolean(),
    "json": ls.Json(),
    "blob": ls.Blob(),
    "array": ls.Array(),
    "vector": ls.Vector(3),
}


def test_none_for_every_nullable_field_type(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), **_ALL_TYPES})
    coll.put({"k": "explicit", **{name: None for name in _ALL_TYPES}})
    coll.put({"k": "omitted"})
    for key in ("explicit", "omitted"):
        assert coll.get(key) == {"k": key, **{name: None for name in _ALL_TYPES}}
    assert coll.count(where={"integer": None}) == 2


def test_defaults_fill_omitted_fields(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={
        "k": ls.Text(),
        "t": ls.Text(default="untitled"),
        "n": ls.Integer(default=0),
        "r": ls.Real(default=0.5),
        "b": ls.Boolean(default=False),
        "j": ls.Json(default={"tags": []}),
    })
    coll.put({"k": "a"})
    assert coll.get("a") == {"k": "a", "t": "untitled", "n": 0, "r": 0.5, "b": False, "j": {"tags": []}}
    # An explicit value wins; an explicit None on a nullable field is kept as None.
    coll.put({"k": "b", "t": "given", "n": None})
    assert coll.get("b") == {"k": "b", "t": "given", "n": None, "r": 0.5, "b": False, "j": {"tags": []}}


def test_mutable_json_default_is_not_shared(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "j": ls.Json(default={"tags": []})})
    coll.put({"k": "a"})
    row = coll.get("a")
    assert row is not None
    row["j"]["tags"].append("mutated")
    coll.put({"k": "b"})
    assert coll.get("b") == {"k": "b", "j": {"tags": []}}


def test_defaults_survive_reopen(store_path: Path) -> None:
    with ls.open(store_path) as s:
        s.collection("t", key="k", fields={"k": ls.Text(), "n": ls.Integer(default=7), "t": ls.Text(default="x")})
    with ls.open(store_path) as s:
        coll = s.collection("t")
        assert coll.fields["n"].default == 7
        coll.put({"k": "a"})
        assert coll.get("a") == {"k": "a", "n": 7, "t": "x"}


def test_non_nullable_field_requires_a_value(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "n": ls.Integer(nullable=False)})
    with pytest.raises(ls.ValidationError, match=r"t\.n"):
        coll.put({"k": "a"})
    with pytest.raises(ls.ValidationError, match=r"t\.n"):
        coll.put({"k": "a", "n": None})
    assert coll.count() == 0
    coll.put({"k": "a", "n": 0})
    assert coll.get("a") == {"k": "a", "n": 0}


def test_non_nullable_field_with_default(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text(), "n": ls.Integer(nullable=False, default=3)})
    coll.put({"k": "a"})
    assert coll.get("a") == {"k": "a", "n": 3}
    with pytest.raises(ls.ValidationError, match=r"t\.n"):
        coll.put({"k": "b", "n": None})
    assert coll.get("b") is None


@pytest.mark.parametrize(
    "field",
    [ls.Integer(default="x"), ls.Real(default=float("nan")), ls.Text(default=5), ls.Boolean(default=1),
     ls.Blob(default=b"x"), ls.Json(default={"x": {1, 2}})],
    ids=["int-str", "real-nan", "text-int", "bool-int", "blob-not-json", "json-set"],
)
def test_invalid_default_is_schema_error(store: ls.Store, field: ls.Field) -> None:
    with pytest.raises(ls.SchemaError, match=r"t\.v"):
        store.collection("t", key="k", fields={"k": ls.Text(), "v": field})
    assert store.collections() == []


def test_field_classes_are_accepted_uninstantiated(store: ls.Store) -> None:
    coll = store.collection("t", key="k", fields={"k": ls.Text, "n": ls.Integer, "r": ls.Real})
    coll.put({"k": "a", "n": 1, "r": 2.0})
    assert coll.get("a") == {"k": "a", "n": 1, "r": 2.0}
    assert math.isclose(coll.find(where={"n": 1})[0]["r"], 2.0)


@pytest.mark.parametrize("value", [np.arange(12, dtype="<f4").reshape(3, 4), np.array([b"abc", b"d"], dtype="S3"),
                                   np.zeros(5, dtype="<M8[ns]"), np.array(7, dtype=">i2")], ids=["f4", "S3", "M8", "0d"])
def test_a_damaged_array_header_raises_corrupt_store_error_and_nothing_else(value: np.ndarray) -> None:
    """Every byte of the magic, length and dtype/shape header, flipped every way: the right array or CorruptStoreError."""
    from localstore.fields import decode_array

    encoded = ls.Array().encode(value)
    header_end = 6 + int.from_bytes(encoded[4:6], "little")
    others: list[str] = []
    for pos in range(header_end):
        for mask in range(1, 256):
            damaged = bytearray(encoded)
            damaged[pos] ^= mask
            try:
                decode_array(bytes(damaged))
            except ls.CorruptStoreError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point of the test
                others.append(f"byte {pos} ^ {mask:#x}: {exc!r}")
    assert others == []
