"""Compiles ``where`` and ``order_by`` arguments into parameterised SQL.

Only declared, comparable fields may appear; every value goes through its field's
validation and is bound as a parameter, never spliced into the SQL text.
"""

from __future__ import annotations

import json
from typing import Any

from ._sqlite import quote
from .errors import QueryError, ValidationError
from .schema import CollectionSchema

_OPERATORS = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "in": "IN", "not in": "NOT IN"}


def _column(schema: CollectionSchema, name: object, purpose: str) -> str:
    if not isinstance(name, str) or name not in schema.fields:
        raise QueryError(
            f"{schema.name}: unknown field {name!r} in {purpose}; fields are {', '.join(schema.fields)}"
        )
    f = schema.fields[name]
    if getattr(f, "encrypt", False) or getattr(f, "compress", False):
        hint = "; declare it with blind_index=True to match equal values" if f.encrypt and purpose == "where" else ""
        raise QueryError(
            f"{schema.name}.{name}: an {'encrypted' if f.encrypt else 'compressed'} field cannot be used in {purpose}{hint}"
        )
    if not f.comparable:
        raise QueryError(f"{schema.name}.{name}: {f.type_name} fields cannot be used in {purpose}")
    return name


def _bind(schema: CollectionSchema, name: str, value: Any) -> Any:
    try:
        return schema.fields[name].encode(value)
    except ValidationError as exc:
        raise QueryError(f"in where: {exc}") from None


def compile_where(schema: CollectionSchema, where: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """Turn a ``where`` dict into a SQL condition (``""`` for none) and its parameters.

    ``{"regime": "geometric", "phi": {">": 0.7}, "god": {"in": ["a", "b"]}, "x": None}``
    means regime = 'geometric' AND phi > 0.7 AND god IN ('a','b') AND x IS NULL.
    """
    if where is None:
        return "", []
    if not isinstance(where, dict):
        raise QueryError(f"{schema.name}: where must be a dict of field -> value or {{op: value}}, got {where!r}")
    clauses: list[str] = []
    params: list[Any] = []
    for name, condition in where.items():
        field = schema.fields.get(name) if isinstance(name, str) else None
        if field is not None and getattr(field, "blind_index", False) and field.codec is not None:
            clause, values = field.codec.blind_condition(quote(name), condition)  # see codecs.py
            clauses.append(clause)
            params += values
            continue
        column = quote(_column(schema, name, "where"))
        tests = condition if isinstance(condition, dict) else {"=": condition}
        if not tests:
            raise QueryError(f"{schema.name}.{name}: empty condition dict in where")
        for op, value in tests.items():
            sql_op = _OPERATORS.get(op.lower() if isinstance(op, str) else op)
            if sql_op is None:
                raise QueryError(
                    f"{schema.name}.{name}: unknown operator {op!r}; use one of {', '.join(sorted(set(_OPERATORS)))}"
                )
            if sql_op in ("IN", "NOT IN"):
                if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                    raise QueryError(f"{schema.name}.{name}: {op!r} takes a list of values, got {value!r}")
                encoded = [_bind(schema, name, v) for v in value]
                clauses.append(f"{column} {sql_op} (SELECT value FROM json_each(?))")
                params.append(json.dumps(encoded))
            elif value is None:
                if sql_op not in ("=", "!="):
                    raise QueryError(f"{schema.name}.{name}: None can only be compared with = or !=")
                clauses.append(f"{column} IS {'NOT ' if sql_op == '!=' else ''}NULL")
            else:
                clauses.append(f"{column} {sql_op} ?")
                params.append(_bind(schema, name, value))
    return " AND ".join(clauses), params


def compile_order(schema: CollectionSchema, order_by: str | list[str] | tuple[str, ...] | None) -> str:
    """Turn ``"phi"``, ``"-phi"`` or a list of them into an ORDER BY list (``""`` for none)."""
    if order_by is None:
        return ""
    items = [order_by] if isinstance(order_by, str) else order_by
    if not isinstance(items, (list, tuple)) or not items:
        raise QueryError(f"{schema.name}: order_by must be a field name, '-name', or a list of them")
    parts = []
    for item in items:
        if not isinstance(item, str):
            raise QueryError(f"{schema.name}: order_by items must be strings, got {item!r}")
        descending = item.startswith("-")
        name = _column(schema, item.lstrip("-+"), "order_by")
        parts.append(f"{quote(name)} {'DESC' if descending else 'ASC'}")
    return ", ".join(parts)


def check_limit(value: object, what: str) -> int | None:
    """Validate a limit or offset: None or a non-negative int."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QueryError(f"{what} must be a non-negative int or None, got {value!r}")
    return value


def compile_fields(schema: CollectionSchema, fields: object) -> tuple[str, ...]:
    """Validate a projection (``fields=[...]``): declared names, key first, each once, in the order given.

    The key is always part of the result, so a row can be told apart from its peers.
    """
    if isinstance(fields, (str, bytes)) or not isinstance(fields, (list, tuple, set, frozenset)):
        raise ValidationError(
            f"{schema.name}: fields= takes a list of field names, got {fields!r}; e.g. fields=[{schema.key!r}]"
        )
    unknown = [name for name in fields if not isinstance(name, str) or name not in schema.fields]
    if unknown:
        raise ValidationError(
            f"{schema.name}: unknown field(s) {', '.join(map(repr, unknown))} in fields=; "
            f"declared fields are {', '.join(schema.fields)}"
        )
    chosen = dict.fromkeys([schema.key, *fields])  # ordered and without repeats
    return tuple(chosen)
