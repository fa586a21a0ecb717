"""The collection the key-rotation and model-based sync tests share: plain fields, a data-key field, a subject-key field."""

from __future__ import annotations

from typing import Any

import localstore as ls

COLL = "people"
FIELDS: dict[str, Any] = {
    "pid": ls.Text(),
    "subj": ls.Text(),  # the subject a row's email belongs to
    "name": ls.Text(),  # plain
    "n": ls.Integer(),  # plain
    "secret": ls.Text(encrypt=True, compress=True),  # under the store's data key
    "email": ls.Text(encrypt=True, subject="subj"),  # under the subject's key: forget() shreds it
}


def declare(store: ls.Store) -> ls.Collection:
    """Declare (or reopen) the collection under test."""
    return store.collection(COLL, key="pid", fields=FIELDS)
