"""Learning profiles: a blind-index lookup, data portability, TTL expiry and the right to erasure.

Run: python examples/kit_profiles.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import localstore as ls
from localstore.kits.profiles import LearningProfiles


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / "master.key"
    if not key_file.exists():
        ls.write_key_file(key_file, ls.generate_key())  # personal values are encrypted under keys wrapped by it
    store = ls.open(out / "tutor.db", key_file=key_file)
    profiles = LearningProfiles(store)

    # Two learners. The user id is stored encrypted, with a blind index for lookups.
    ada = profiles.create_profile(user_id="ada@example.org", learning_style="visual", preferred_difficulty="hard",
                                  knowledge_domains=["math"], learning_goals=["calculus by June"],
                                  sensitive_data={"accessibility": "screen reader"}, ttl_seconds=365 * 86400)
    bo = profiles.create_profile(user_id="bo@example.org", learning_style="auditory",
                                 ttl_expires_at=0.0)  # an already expired retention date, for the demo
    profiles.record_session(ada, domain="math", topics=["limits"], performance={"correct": 7, "of": 10},
                            notes="struggled with epsilon-delta")
    profiles.update_knowledge(ada, "math", "limits", mastery=0.55, confidence=0.7)
    profiles.update_knowledge(ada, "math", "limits", mastery=0.65, confidence=0.75)  # same key: updated in place
    found = profiles.find_by_user("ada@example.org")
    print(f"lookup by user id through the blind index -> profile {found['profile_id'] if found else None}")
    print(f"knowledge states of ada: {[(s['topic'], s['mastery'], s['attempts']) for s in profiles.knowledge(ada)]}")

    # Data portability: everything about ada, as JSON (written 0600).
    profiles.export_json(ada, out / "ada-export.json")
    exported = json.loads((out / "ada-export.json").read_text())
    print(f"export: {len(exported['sessions'])} session(s), {len(exported['knowledge_states'])} knowledge state(s)")

    backup = store.backup(out / "tutor-backup.db")  # taken before the erasure below

    # TTL: expired profiles are forgotten (crypto-shredded) and then deleted.
    print(f"expire_profiles() -> {profiles.expire_profiles()} (bo was {bo})")

    # Right to erasure: ada's key is destroyed; her values are gone from the store, backups and change log.
    print(f"forget(ada) -> {profiles.forget(ada)}")
    print(f"ada's learning style now reads as {profiles.get_profile(ada)['learning_style']!r}")  # type: ignore[index]
    print(f"lookup by her user id now finds {profiles.find_by_user('ada@example.org')}")
    after = profiles.export(ada)
    print(f"export after forget: user_id={after['profile']['user_id']}, forgotten fields {after['profile']['_forgotten']}")
    with ls.open(backup, key_file=key_file, keys_from=store) as copy:
        old = copy.collection("learning_profiles").get(ada)
        print(f"in the backup taken earlier, her sensitive data reads as {old['sensitive_data']!r}")  # type: ignore[index]
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-profiles-out"))
