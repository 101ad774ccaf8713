"""The PostgreSQL spool's schema: its migrations, applied once by whichever replica starts first."""

from __future__ import annotations

from gateway.errors import SpoolError
from gateway.spool import audit as trail
from gateway.spool import lane
from gateway.spool.postgres_conn import SCHEMA, PgConn
from gateway.spool.store import PARTITIONS

_MIGRATE_LOCK = 0x6462_6777_0001  # advisory lock keys: "dbgw" and a number

# Each entry brings a database from the version before it to its own number (its index + 1).
# Never edit a released entry: add one.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE inbox (
        id bigserial PRIMARY KEY,          -- a sequence: ids never come back
        received_at double precision NOT NULL,
        type text NOT NULL,
        body bytea NOT NULL,
        direction smallint NOT NULL,       -- 0: to Braze; 1: Braze's reports, to Didomi
        part smallint NOT NULL             -- the person's partition, 0..{PARTITIONS - 1}
    );
    CREATE INDEX inbox_direction ON inbox(direction, id);
    CREATE TABLE seen (key text PRIMARY KEY, at double precision NOT NULL);
    CREATE INDEX seen_at ON seen(at);
    CREATE TABLE applied (
        person text NOT NULL, target text NOT NULL, at double precision NOT NULL,
        PRIMARY KEY (person, target)
    );
    CREATE TABLE sent (
        person text NOT NULL, target text NOT NULL, state text NOT NULL,
        at double precision NOT NULL, PRIMARY KEY (person, target)
    );
    CREATE TABLE dead_letters (
        id bigserial PRIMARY KEY,
        created_at double precision NOT NULL,
        received_at double precision NOT NULL,
        type text NOT NULL,
        body bytea NOT NULL,
        person text,
        reason text NOT NULL,
        part smallint NOT NULL             -- kept, so a replayed letter returns to its person's
    );
    CREATE TABLE meta (key text PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        person text NOT NULL,
        direction text NOT NULL,
        event_id text,
        event_type text,
        event_at double precision,
        endpoint text,
        target text,
        state text,
        rule text,
        status integer,
        outcome text NOT NULL,
        detail text
    );
    CREATE INDEX audit_person ON audit(person, at);
    CREATE INDEX audit_event ON audit(event_id);
    CREATE TABLE floors (target text PRIMARY KEY, at double precision NOT NULL);
    -- Who delivers each partition, until when (the database's clock, epoch seconds).
    CREATE TABLE leases (
        part smallint PRIMARY KEY,
        owner text,
        until double precision NOT NULL DEFAULT 0
    );
    INSERT INTO leases(part) SELECT generate_series(0, {PARTITIONS - 1});
    CREATE TABLE replicas (name text PRIMARY KEY, seen_at double precision NOT NULL);
    -- Token buckets shared by every replica: Braze's requests_per_second is per workspace.
    CREATE TABLE budgets (
        name text PRIMARY KEY,
        at double precision NOT NULL,      -- the next free turn (the database's clock)
        blocked_until double precision NOT NULL DEFAULT 0
    );
    """,
    # 2: a replayed dead letter keeps its `received_at` (its dating); this restarts give-up.
    "ALTER TABLE inbox ADD COLUMN replayed_at double precision;",
    # 3: `sent` keeps every state sent per person and target (its latest time each), not only
    # the last: Currents reports each write, in any order, and each must be known as an echo.
    """
    ALTER TABLE sent DROP CONSTRAINT sent_pkey, ADD PRIMARY KEY (person, target, state);
    """,
    # 4: `gateway backfill`'s progress per source (its rows are inbox rows, direction 2).
    lane.PG_MIGRATION,
    # 5: a dead letter keeps the inbox direction it came from, so a replayed backfilled user
    # goes back to its lane (its type is a live webhook's); NULL before: told by the type.
    "ALTER TABLE dead_letters ADD COLUMN direction smallint;",
    # 6: one audit record per object and event, its changes packed (`audit.write`); records
    # written before keep their one change in target, state and rule, read as they were.
    trail.PG_MIGRATION,
)
VERSION = len(MIGRATIONS)


def migrate(conn: PgConn) -> tuple[int, int]:
    """Bring the schema to `VERSION`; returns (version before, version after).

    Serialised by an advisory lock, so replicas starting together migrate once; a database
    a newer gateway migrated is refused, since this one would not know its tables.
    """
    raw = conn.raw
    with raw.transaction():
        raw.execute(b"SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        raw.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}".encode())
        raw.execute(b"CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = raw.execute(b"SELECT max(version) FROM schema_version").fetchone()
        before = int(row[0]) if row and row[0] is not None else 0
        if before > VERSION:
            raise SpoolError(
                f"the spool database is at schema version {before}, newer than this gateway's"
                f" {VERSION}: run the gateway version that migrated it, or a newer one"
            )
        for version in range(before + 1, VERSION + 1):
            raw.execute(MIGRATIONS[version - 1].encode())
            raw.execute(b"INSERT INTO schema_version(version) VALUES (%s)", (version,))
    return before, VERSION
