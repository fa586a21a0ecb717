"""Partial updates: change some fields of existing rows in place, logged like a put.

``Collection.update(key, {field: value, ...})`` validates each value as ``put`` does
(and encrypts or compresses it when its field says so), writes only the named
columns with one UPDATE per row, and appends a change record that refers to the
row, exactly as a fresh put does. The UPDATE trigger of the collection first copies
the row's previous values into the record that described them, so every change
record still reproduces a whole row as it was written, and sync, ``verify()`` and
the replica code see nothing new: an update is a put of the row as it now stands.

Derived indexes (vec0, FTS5) and the in-memory vector caches are rewritten only for
the rows and indexes whose vector, filter or full-text fields changed; the other
fields (a 64 KB blob, say) are neither read nor rewritten.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._sqlite import boundary, quote
from .collection import OP_PUT
from .errors import NotFoundError, ValidationError
from .keys import FORGOTTEN

if TYPE_CHECKING:
    from .collection import Collection

#: Missing keys named in a NotFoundError message before "and N more".
_SHOW_MISSING = 5


def as_items(changes: Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]]) -> list[tuple[Any, Any]]:
    """Normalise ``update_many``'s argument: a dict of key -> changes, or (key, changes) pairs."""
    if isinstance(changes, Mapping):
        return list(changes.items())
    items = []
    for item in changes:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValidationError(
                f"update_many takes a dict of key -> {{field: value}} or (key, {{field: value}}) pairs, got {item!r}"
            )
        items.append(item)
    return items


def update_rows(coll: Collection, items: list[tuple[Any, Any]]) -> int:
    """Apply partial updates in one transaction (all or none); return how many were applied.

    Every key must have a row (else ``NotFoundError``, nothing written). Updates of
    the same key apply in the order given.
    """
    if not items:
        return 0
    store = coll.store
    with store.transaction():
        db = store._db
        checked = [(coll._check_key(key), _check_changes(coll, key, changes)) for key, changes in items]
        codec = coll._codec
        if codec is not None:
            changed = {n for _, values in checked for n in values}
            if changed.isdisjoint(codec.fields) and changed.isdisjoint(codec.subject_fields):
                codec = None  # no encrypted or compressed field changes, and no field they take their key from
        subjects = codec.subject_fields if codec is not None else ()
        with boundary(store.path, f"updating {coll.name!r}"):
            found = _current(coll, db, list(dict.fromkeys(k for k, _ in checked)), subjects)
        missing = [k for k, _ in checked if k not in found]
        if missing:
            shown = ", ".join(map(repr, missing[:_SHOW_MISSING]))
            more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
            raise NotFoundError(
                f"store {store.path}, collection {coll.name!r}: no row with key {shown}{more} to update; "
                "update changes existing rows only (put() creates them); nothing was written"
            )
        if codec is not None:
            checked = [(k, _encode_codec_fields(coll, k, values, found[k][1])) for k, values in checked]
        logged = coll._schema.sync
        seq, hlc = store._allocate(len(checked), logged)
        with boundary(store.path, f"updating {coll.name!r}"):
            _write(coll, db, checked, seq, hlc, logged)
            _refresh_derived(coll, db, checked, found)
    return len(checked)


def _check_changes(coll: Collection, key: Any, changes: Any) -> dict[str, Any]:
    """Validate one update's fields and values; return the stored (encoded, not yet encrypted) values."""
    where = f"{coll.name}[{key!r}]"
    if not isinstance(changes, Mapping):
        raise ValidationError(f"{where}: update takes a dict of field -> value, got {type(changes).__name__}")
    if not changes:
        raise ValidationError(f"{where}: update was given no fields to change; pass {{field: value, ...}}")
    unknown = [n for n in changes if n not in coll._field_set]
    if unknown:
        raise ValidationError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; declared fields are "
            f"{', '.join(coll._fields)}. Redeclare the collection with the new field to add it"
        )
    out: dict[str, Any] = {}
    for name, value in changes.items():
        field = coll._fields[name]
        if name == coll.key:
            if value is None or field.encode(value) != coll._check_key(key):
                raise ValidationError(
                    f"{where}: update cannot change the key {coll.key!r} (to {value!r}); put the row under "
                    "the new key and delete the old one"
                )
            continue
        if value is None:
            if not field.nullable:
                raise ValidationError(f"{coll.name}.{name}: a value is required (the field is not nullable); key {key!r}")
            out[name] = None
        else:
            out[name] = field.encode(value)
    if not out:
        raise ValidationError(f"{where}: update was given only the key; pass the fields to change")
    return out


@functools.lru_cache(maxsize=256)
def _current_sql(table: str, key: str, subjects: tuple[str, ...], one: bool) -> str:
    cols = ", ".join(["rowid", *(quote(n) for n in subjects)])
    where = "= ?" if one else "IN (SELECT value FROM json_each(?))"
    return f"SELECT {quote(key)}, {cols} FROM {table} WHERE {quote(key)} {where}"


def _current(
    coll: Collection, db: Any, keys: list[Any], subjects: tuple[str, ...]
) -> dict[Any, tuple[int, dict[str, Any]]]:
    """For each key that has a row: its rowid and its stored subject fields (what encryption keys depend on)."""
    one = len(keys) == 1
    sql = _current_sql(coll._schema.table, coll.key, subjects, one)
    arg = keys[0] if one else json.dumps(keys)
    return {r[0]: (int(r[1]), dict(zip(subjects, r[2:]))) for r in db.execute(sql, (arg,))}


def _encode_codec_fields(coll: Collection, key: Any, values: dict[str, Any], stored_subjects: dict[str, Any]) -> dict[str, Any]:
    """Encrypt and compress the changed codec fields, as put would.

    A field encrypted under a subject's key follows its subject: when the update moves
    the subject, that field is re-encrypted under the new subject's key even if its
    value is unchanged, so ``store.forget(new_subject)`` reaches it as it would after a put.
    """
    codec = coll._codec
    assert codec is not None
    row = {**stored_subjects, **values}  # what a codec reads the subject from
    moved = [n for n, c in codec.fields.items() if c.subject in values and n not in values]
    if moved:
        current = coll.get(key, fields=moved)
        assert current is not None
        for name in moved:
            value = current[name]
            if value is FORGOTTEN:
                raise ValidationError(
                    f"{coll.name}[{key!r}].{name}: its value was forgotten (store.forget), so it cannot follow "
                    f"its subject {codec.fields[name].subject!r} to a new key; set {name!r} in the same update"
                )
            values[name] = None if value is None else coll._fields[name].encode(value)
    out = dict(values)
    for name, value in values.items():
        if value is not None and name in codec.fields:
            out[name] = codec.encoder(name)(value, key, row)
    return out


def _write(coll: Collection, db: Any, checked: list[tuple[Any, dict[str, Any]]], seq: int, hlc: int, logged: bool) -> None:
    """Run the UPDATEs (and change-log inserts), batching consecutive updates of the same fields."""
    table, kcol = coll._schema.table, quote(coll.key)
    start = 0
    while start < len(checked):
        names = tuple(checked[start][1])
        end = start + 1
        while end < len(checked) and tuple(checked[end][1]) == names:
            end += 1
        sql = _update_sql(table, kcol, names, coll._schema.id if logged else None)
        if logged:
            bindings = [
                (*values.values(), seq + i, hlc + i, key, seq + i, hlc + i, key)
                for i, (key, values) in enumerate(checked[start:end], start)
            ]
        else:
            bindings = [(*values.values(), hlc + i, key) for i, (key, values) in enumerate(checked[start:end], start)]
        try:
            db.executemany(sql, bindings)
        except UnicodeEncodeError:
            _raise_bad_text(coll, checked[start:end])
            raise
        start = end


@functools.lru_cache(maxsize=256)
def _update_sql(table: str, kcol: str, names: tuple[str, ...], logged_as: int | None) -> str:
    """The UPDATE of these columns by key, and the change record after it when the collection is logged."""
    sets = ", ".join(f"{quote(n)} = ?" for n in names)
    if logged_as is None:
        return f"UPDATE {table} SET {sets}, _ls_seq = NULL, _ls_hlc = ? WHERE {kcol} = ?"
    return (
        f"UPDATE {table} SET {sets}, _ls_seq = ?, _ls_hlc = ? WHERE {kcol} = ?; "
        f"INSERT INTO _ls_changes(seq, hlc, coll, key, op) VALUES(?, ?, {logged_as}, ?, {OP_PUT})"
    )


def _raise_bad_text(coll: Collection, checked: list[tuple[Any, dict[str, Any]]]) -> None:
    """Name the field whose text SQLite could not take as UTF-8 (a lone surrogate)."""
    from .fields import raise_bad_text

    raise_bad_text(coll.name, ((key, name, value) for key, values in checked for name, value in values.items()))


def _refresh_derived(
    coll: Collection, db: Any, checked: list[tuple[Any, dict[str, Any]]], found: dict[Any, tuple[int, Any]]
) -> None:
    """Bring the vec0/FTS entries (and the queued vector-cache patches) of changed rows up to date.

    A row whose vector or full-text field changed is re-indexed from its stored values
    as they now are (after every update of the batch). A row whose filter fields alone
    changed keeps its vec0 entry: only the metadata columns are set, in update order.
    """
    derived = coll._derived
    if derived.empty or all(derived.indexed_fields.isdisjoint(values) for _, values in checked):
        return
    store = coll.store
    # Rows above a vec0 index's high-water rowid have no entry yet: its next catch-up reads them as they now are.
    through = {name: index.indexed_through(db) for name, index in derived.vectors.items()}
    rewrite: dict[str, set[int]] = {}  # index name ("vec:<field>" or "fts") -> rowids to re-index
    meta: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # vector field -> (rowid, changed filter values)
    cached = {n for n in derived.vectors if (coll.name, n) in store._vectors.caches}
    for key, values in checked:
        rowid = found[key][0]
        for name, index in derived.vectors.items():
            if rowid > through[name] and name not in cached:
                continue
            if name in values:
                rewrite.setdefault(f"vec:{name}", set()).add(rowid)
            else:
                changed = {f: values[f] for f in index.filters if f in values}
                if changed:
                    meta.setdefault(name, []).append((rowid, changed))
        if derived.fulltext is not None and any(f in values for f in derived.fulltext.fields):
            rewrite.setdefault("fts", set()).add(rowid)
    wanted = set().union(*rewrite.values(), (r for n in cached for r, _ in meta.get(n, ())))
    stored: dict[int, tuple[Any, ...]] = {}
    if wanted:
        cols = ", ".join(quote(n) for n in coll._order)
        sql = f"SELECT rowid, {cols} FROM {coll._schema.table} WHERE rowid IN (SELECT value FROM json_each(?))"
        stored = {int(r[0]): tuple(r[1:]) for r in db.execute(sql, (json.dumps(sorted(wanted)),))}
    fpos = coll._filter_positions
    for name, index in derived.vectors.items():
        full = sorted(rewrite.get(f"vec:{name}", ()))
        indexed = [r for r in full if r <= through[name]]
        if indexed:
            db.executemany(index.sql_delete, [(r,) for r in indexed])
            index.insert(db, indexed, [stored[r] for r in indexed])
        # A re-indexed row already carries its final filter values.
        _set_filters(index, db, [(r, v) for r, v in meta.get(name, ())
                                 if r <= through[name] and r not in rewrite.get(f"vec:{name}", ())])
        if name in cached:
            touched = list(dict.fromkeys([*full, *(r for r, _ in meta.get(name, ()))]))
            pos = coll._vector_positions[name]
            store._vectors.note(coll.name, name, [(r, stored[r][pos], tuple(stored[r][p] for p in fpos)) for r in touched])
    if derived.fulltext is not None and rewrite.get("fts"):
        rows = sorted(rewrite["fts"])
        db.executemany(derived.fulltext.sql_delete, [(r,) for r in rows])
        derived.fulltext.insert(db, rows, [stored[r] for r in rows])


def _set_filters(index: Any, db: Any, changes: list[tuple[int, dict[str, Any]]]) -> None:
    """Apply filter-only changes to a vec0 index in order, one statement per run of the same fields."""
    start = 0
    while start < len(changes):
        names = tuple(changes[start][1])
        end = start + 1
        while end < len(changes) and tuple(changes[end][1]) == names:
            end += 1
        index.update_filters(db, names, [(*v.values(), r) for r, v in changes[start:end]])
        start = end
