"""Encrypted, compressed agent memories; a lookup by e-mail; a key rotation; and a user forgotten everywhere.

Run: python examples/privacy_forget.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import localstore as ls


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / "master.key"
    if not key_file.exists():
        ls.write_key_file(key_file)  # a new random master key, mode 0600
    path = out / "agent.db"
    store = ls.open(path, key_file=key_file)

    profiles = store.collection("profiles", key="profile_id", fields={
        "profile_id": ls.Text(),
        "email": ls.Text(encrypt=True, blind_index=True, subject="profile_id"),  # findable, forgettable
        "goals": ls.Json(encrypt=True, compress=True, subject="profile_id"),
        "state": ls.Array(encrypt=True, compress=True),                           # numpy, dtype/shape kept
    })
    memories = store.collection("memories", key="id", fields={
        "id": ls.Integer(),
        "profile_id": ls.Text(index=True),
        "text": ls.Text(encrypt=True, compress=True, subject="profile_id"),
        "summary": ls.Text(compress=True),  # not encrypted: may get a trained zstd dictionary
    })
    people = {"ada": "ada@example.org", "bo": "bo@example.org", "cy": "cy@example.org"}
    profiles.put_many([
        {"profile_id": p, "email": e, "goals": {"learn": ["geometry", "music"], "owner": p},
         "state": np.linspace(0, 1, 64, dtype="<f4").reshape(8, 8)}
        for p, e in people.items()
    ])
    memories.put_many([
        {"id": i, "profile_id": p, "text": f"{p} told the agent a private thing, number {i}.",
         "summary": f"conversation {i} about goals and progress"}
        for i, p in enumerate(list(people) * 4)
    ])
    found = profiles.find(where={"email": "bo@example.org"})
    print(f"blind-index lookup of bo@example.org -> {[r['profile_id'] for r in found]}")
    print(f"state array comes back as {found[0]['state'].dtype} {found[0]['state'].shape}")

    backup = store.backup(out / "agent-backup.db")
    print(f"backup taken: {backup}")

    old_key = key_file.read_text().strip()  # backups taken before a rotation still open with the old key
    new_key = ls.generate_key()
    print(f"rotate_key re-wrapped {store.rotate_key(new_key)} keys; reencrypt rewrote {store.reencrypt()} rows")
    key_file.unlink()
    ls.write_key_file(key_file, new_key)

    print(f"forget('bo') -> {store.forget('bo')}")
    bo = profiles.get("bo")
    assert bo is not None
    print(f"after forget, bo's email reads as {bo['email']!r}; lookup finds {profiles.find(where={'email': 'bo@example.org'})}")
    texts = [m["text"] for m in memories.find(where={"profile_id": "bo"})]
    print(f"bo's memories: {texts}")
    ada = memories.find(where={"profile_id": "ada"})[0]["text"]
    print(f"ada is untouched: {ada!r}")
    logged = [memories.decode_payload(c.payload) for c in store.changelog.changes(limit=10_000)
              if c.collection == "memories" and c.payload]
    print(f"change log: {sum(1 for r in logged if r['text'] is ls.FORGOTTEN)} of {len(logged)} memory records now read as FORGOTTEN")
    with ls.open(backup, key=old_key, keys_from=store) as copy:  # the backup taken before forget
        print(f"backup taken earlier, bo's email: {copy.collection('profiles').get('bo')['email']!r}")  # type: ignore[index]
    store.close()

    raw = b"".join(p.read_bytes() for p in out.iterdir() if p.name.startswith("agent"))
    print(f"plaintext e-mails found in the store, WAL and backup files: {raw.count(b'@example.org')}")
    os.environ.pop("LOCALSTORE_KEY", None)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "privacy-out"))
