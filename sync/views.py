"""Central views under the names the replaced systems used, one per kit table, plus derived views.

After a workspace syncs, ``create_kit_views(url)`` creates, in their own Postgres
schema (``agents`` by default, so kits never clash with other tables), one view per
kit collection named as the systems used it (``kernel_geometry``, ``memories``,
``telemetry_records``, ...), with the collection's columns plus ``agent`` (the store
name) and ``store_id``, leaving out deleted rows. Vector columns stay pgvector, so
``ORDER BY basin_coordinates <=> $1`` works; encrypted columns stay ciphertext.
Derived views: ``latest_telemetry``, ``best_checkpoints``, ``emergency_summary`` and
``session_stats``. Views over tables that do not exist yet are skipped; run it again
after more kits have synced (it replaces the views).

With tenancy set up (``localstore sync tenancy setup``), the views are shared objects
that only the admin creates. On Postgres 15 and later they are made
``security_invoker``, and granted to the tenants' group: a tenant querying them sees
its own stores' rows only, as row-level security applies to the querying role. On
older servers a view would read with its owner's rights, so tenants get no grant.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from .central import DEFAULT_SCHEMA, Central, state_table_name
from .errors import TenancyError
from .merge import STATE_COLUMNS
from .tenancy import marker

#: The schema holding the kit views.
DEFAULT_VIEWS_SCHEMA = "agents"

#: Every kit table, named as the systems the kits replace named them.
KIT_TABLES = (
    "kernel_geometry", "memories", "reflections", "tone_shifts",
    "telemetry_sessions", "telemetry_records", "emergency_events", "checkpoints", "checkpoint_states", "checkpoint_history", "basin_history",
    "evolution_rounds", "fitness_metrics", "resource_metrics", "selection_outcomes", "programs",
    "learning_profiles", "learning_sessions", "knowledge_states", "documents", "chunks",
)

#: Derived views: name -> (the kit views they need, the SELECT over the views schema "{v}").
DERIVED: dict[str, tuple[tuple[str, ...], str]] = {
    "latest_telemetry": (("telemetry_records",), (
        "SELECT DISTINCT ON (r.store_id, r.session_id) r.* FROM {v}.telemetry_records r "
        "ORDER BY r.store_id, r.session_id, r.step DESC"
    )),
    "best_checkpoints": (("checkpoints",), (
        "SELECT c.* FROM {v}.checkpoints c ORDER BY c.phi DESC NULLS LAST, c.created_at DESC LIMIT 10"
    )),
    "emergency_summary": (("emergency_events",), (
        "SELECT e.agent, e.store_id, e.session_id, count(*) AS emergency_count, "
        "count(DISTINCT e.reason) AS distinct_reasons, max(e.timestamp) AS last_emergency_at, "
        "min(e.timestamp) AS first_emergency_at, mode() WITHIN GROUP (ORDER BY e.severity) AS typical_severity, "
        "max(e.value) AS max_value FROM {v}.emergency_events e GROUP BY e.agent, e.store_id, e.session_id"
    )),
    "session_stats": (("telemetry_sessions", "checkpoints"), (
        "SELECT s.agent, s.store_id, s.session_id, s.status, s.started_at, s.ended_at, s.total_steps, "
        "s.avg_phi, s.max_phi, s.emergency_count, count(c.checkpoint_id) AS checkpoint_count, "
        "max(c.phi) AS best_checkpoint_phi FROM {v}.telemetry_sessions s "
        "LEFT JOIN {v}.checkpoints c ON c.store_id = s.store_id AND c.session_id = s.session_id "
        "GROUP BY s.agent, s.store_id, s.session_id, s.status, s.started_at, s.ended_at, s.total_steps, "
        "s.avg_phi, s.max_phi, s.emergency_count"
    )),
}


def create_kit_views(
    url: str, *, schema: str = DEFAULT_SCHEMA, views_schema: str = DEFAULT_VIEWS_SCHEMA
) -> list[str]:
    """Create or replace the kit views over the synced tables; return the names of the views made."""
    central = Central(url, schema)
    try:
        return list(central.run("creating the kit views", lambda conn: _create(conn, schema, views_schema)))
    finally:
        central.close()


def _create(conn: Any, schema: str, views_schema: str) -> list[str]:
    tenancy = marker(conn, schema)
    if tenancy is not None:
        me, admin = conn.execute("SELECT current_user::text, rolsuper OR pg_has_role(current_user, %s::text, 'USAGE') "
                                 "FROM pg_roles WHERE rolname = current_user", (tenancy[1],)).fetchone()
        if not admin:
            raise TenancyError(
                f"role {me!r} is a tenant of schema {schema!r}: the kit views are shared objects that the admin "
                f"creates (localstore sync views --url ADMIN_URL); tenants then query them and see their own rows")
    # security_invoker (Postgres 15+) makes row-level security apply to whoever queries a view.
    invoker = tenancy is not None and conn.info.server_version >= 150000
    options = sql.SQL(" WITH (security_invoker = true)") if invoker else sql.SQL("")
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(views_schema)))
    made: list[str] = []
    for name in KIT_TABLES:
        table = state_table_name(name)
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "ORDER BY ordinal_position", (schema, table))]
        if not columns:
            continue
        fields = [c for c in columns if c not in STATE_COLUMNS]
        select = sql.SQL(
            "CREATE OR REPLACE VIEW {view}{options} AS SELECT s.name AS agent, t._ls_store AS store_id, {cols} "
            "FROM {table} t JOIN {stores} s ON s.store_id = t._ls_store WHERE NOT t._ls_deleted"
        ).format(
            view=sql.Identifier(views_schema, name),
            options=options,
            cols=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in fields),
            table=sql.Identifier(schema, table),
            stores=sql.Identifier(schema, "stores"),
        )
        # A view's columns cannot be reordered in place; drop it when the table gained fields.
        conn.execute(sql.SQL("DROP VIEW IF EXISTS {} CASCADE").format(sql.Identifier(views_schema, name)))
        conn.execute(select)
        made.append(name)
    for name, (needs, body) in DERIVED.items():
        if all(n in made for n in needs):
            query = sql.SQL(body.replace("{v}", "{views}")).format(views=sql.Identifier(views_schema))
            conn.execute(sql.SQL("CREATE OR REPLACE VIEW {}{} AS ").format(sql.Identifier(views_schema, name), options)
                         + query)
            made.append(name)
    if invoker and tenancy is not None:
        group = sql.Identifier(tenancy[0])
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(views_schema), group))
        for name in made:
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(views_schema, name), group))
    return made
