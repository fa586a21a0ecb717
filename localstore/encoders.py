"""Per-row encoders generated for a collection's schema: the hot path of ``put`` and ``put_many``.

A generated function with one inlined type check per field costs a fraction of a
generic loop over the fields. A value passing its field's fast test (a ``str`` for
Text, a finite ``float`` for Real, a float32 array of the right shape for a Vector)
is stored as is; anything else goes through the field's ``encode()``, which
converts or raises the usual ``ValidationError``. Field names are validated
identifiers and appear in the generated source only as string literals.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .fields import Integer, Real, Text, Vector

if TYPE_CHECKING:
    from .codecs import RowCodec
    from .collection import Collection


class RowEncoders(NamedTuple):
    """A collection's encoders: ``row, seq, hlc -> binding`` for logged and unlogged writes."""

    logged: Any
    plain: Any
    #: (position, name, field) of the Vector fields stored straight from float32 arrays,
    #: whose values the writer checks finite for a whole batch at once.
    fast_vectors: list[tuple[int, str, Vector]]
    #: The encrypting/compressing codec, if any field needs one.
    codec: RowCodec | None


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Any:
    """Compile generated encoder source once per process; stores with the same schema share it."""
    return compile(source, "<localstore encoder>", "exec")


def compile_encoders(coll: Collection) -> RowEncoders:
    """Generate a collection's per-row encoders, for rows logged to the change log and not."""
    lines = [
        "def encode(row, seq, hlc):",
        "    if type(row) is not dict: row = as_dict(row)",
        "    if not field_set.issuperset(row): bad_row(row)",
    ]
    env: dict[str, Any] = {"field_set": coll._field_set, "bad_row": coll._bad_row, "as_dict": coll._as_dict,
                           "ndarray": np.ndarray, "f32": np.dtype("<f4")}
    fast_vectors: list[tuple[int, str, Vector]] = []
    # A value passing its fast test is stored as is; anything else goes through encode().
    fast = {
        Text: "type({v}) is not str",
        Real: "(type({v}) is not float or {v} != {v})",
        Integer: "(type({v}) is not int or not -9223372036854775808 <= {v} <= 9223372036854775807)",
    }
    names = []
    codec = None
    if any(f.encrypt or f.compress for f in coll._fields.values()):
        # encrypt/compress fields: encoded after validation, see codecs.py
        from .codecs import RowCodec

        codec = RowCodec(coll, [(n, f) for n, f, _, _ in coll._plan])
    for i, (name, field, default, nullable) in enumerate(coll._plan):
        v = f"v{i}"
        names.append(v)
        env[f"f{i}"], env[f"d{i}"] = field, default
        lines.append(f"    {v} = row.get({name!r}, d{i})")
        test = fast[type(field)].format(v=v) if type(field) in fast else ""
        if type(field) is Vector and field.metric != "fisher_rao":
            # A float32 array of the right shape is stored as its bytes; its values are
            # checked finite for the whole batch at once (see Collection._check_vectors).
            env[f"s{i}"] = (field.dim,)
            bytes_or_encode = (f"{v}.tobytes() if type({v}) is ndarray and {v}.dtype == f32 and {v}.shape == s{i} "
                               f"else f{i}.encode({v})")
            if not nullable:
                lines.append(f"    if {v} is None: missing({name!r})")
                lines.append(f"    {v} = {bytes_or_encode}")
            else:
                lines.append(f"    if {v} is not None: {v} = {bytes_or_encode}")
            fast_vectors.append((i, name, field))
        elif name == coll.key or not nullable:
            lines.append(f"    if {v} is None: missing({name!r})")
            lines.append(f"    {'if ' + test + ': ' if test else ''}{v} = f{i}.encode({v})")
        else:
            lines.append(f"    if {test + ' and ' if test else ''}{v} is not None: {v} = f{i}.encode({v})")
        if codec is not None and name in codec.fields:
            env[f"c{i}"] = codec.encoder(name)
            lines.append(f"    if {v} is not None: {v} = c{i}({v}, v0, row)")
    env["missing"] = coll._missing
    values = ", ".join(names)
    logged = "\n".join(lines + [f"    return ({values}, seq, hlc, seq, hlc, v0)"])
    plain = "\n".join(lines + [f"    return ({values}, None, hlc)"])
    scope: dict[str, Any] = {}
    exec(_compiled(logged), env, scope)  # noqa: S102
    encode_logged = scope["encode"]
    exec(_compiled(plain), env, scope)  # noqa: S102
    return RowEncoders(encode_logged, scope["encode"], fast_vectors, codec)


__all__ = ["RowEncoders", "compile_encoders"]
