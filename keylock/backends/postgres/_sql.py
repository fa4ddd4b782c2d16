"""The Postgres backend's schema and statements: every decision about a key is one statement.

Three objects per ``table`` name (``keylock_leases`` by default, optionally ``schema.name``):

* ``<table>``: one row per key ever locked: ``owner`` (NULL when released), ``token`` (the last
  one minted: the row outlives its lease so tokens keep rising), ``expires_at``, ``took_over``
  (that lease followed one that ended without its holder's release). A lease that expires, or
  that its holder releases late, keeps its owner: the next grant finds an owner whose lease
  ran out, and took the key over. ``released``: the owner ids of the key's last few
  releases, so that a release sent again after its reply was lost (a connection cut between
  the commit and the reply) answers "released", not a false "lost".
* ``<table>_queue``: the waiters, one row per (key, waiting process), in arrival order, each
  with the channel its process LISTENs on and ``stay_until`` (a waiter refreshes it at every
  poll; a dead one drops out of the line when it passes).
* functions ``<table>_acquire``, ``_release`` and ``_leave`` (PL/pgSQL), so acquire, release
  and give-up are one round trip each, and ``<table>_hand_off``, shared by the last two.

Every function first takes ``pg_advisory_xact_lock`` on the key's hash: all decisions about one
key are serialized, in one order (no deadlock between a release and an acquire), and the lock
is transaction-scoped, so nothing outlives the statement: it works behind a transaction-mode
pooler. Tokens are ``max(last + 1, server clock in µs)``: strictly increasing per key even
when the table is truncated (the clock has moved past every token it minted).

Durability: by default the tables are created UNLOGGED: their rows write no WAL, so a grant,
a release or a give-up commits without a WAL record for its row (and, with
``synchronous_commit`` off for its own transaction, waits for no flush on a logged table
either). A clean restart keeps them; a crash of the server empties them at recovery (and a
standby never has them, so a failover starts empty): every lease and place in line is gone.
Tokens still never go back: each is the server clock in µs at its grant (a grant is
serialized per key and takes far longer than 1 µs, so ``last + 1`` only wins if the clock was
stepped back), and the next one after the crash is the clock then, later still. Holders learn
it at their next renewal (within a third of their TTL) or release (the row is not theirs:
lease lost), and fenced writes stay safe, the newer token wins; waiters put themselves back in
line at their next poll.

``durable=True`` makes every table of the schema logged (``ALTER TABLE ... SET LOGGED`` on
tables a default backend created: for every backend on them, since persistence belongs to a
table) and waits for the WAL flush at each commit: grants survive a crash. A default backend
never makes logged tables UNLOGGED again, so tables made by an older version, all logged,
stay logged (with ``synchronous_commit`` off per statement, as before) until an operator
runs ``ALTER TABLE ... SET UNLOGGED`` on the five of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._permit_sql import permit_ddl, permit_probe

__all__ = ["Schema", "schema_for", "stored"]

_NAME = re.compile(r"(?:([a-z_][a-z0-9_]{0,62})\.)?([a-z_][a-z0-9_]{0,39})\Z")

# the version of the statements below: a database holding another is brought up to this one
_VERSION = "keylock schema 4"

# how many of a key's last releasers it remembers: a retried release comes right after its
# first attempt, so only releases of later holders in between could push its mark out
_MARKS = 4

# the server clock in µs since the epoch (numeric: exact)
_CLOCK_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


def _mint(last: str) -> str:
    return f"greatest(coalesce({last}, 0) + 1, {_CLOCK_US})"


def _handed(now: str, took: str) -> str:
    """The hand-off message to the waiter ``head``: "<owner hex> <token> <server µs> <claim ms>
    <took over>" (``minted`` is its token; parsed by ``_waiting``)."""
    return (
        f"pg_notify(head.channel, concat_ws(' ', encode(head.owner, 'hex'), minted, "
        f"(extract(epoch FROM {now}) * 1000000)::bigint, head.claim_ms, {took}::int))"
    )


def tables(table: str) -> tuple[str, ...]:
    """Every table of lock table *table*'s schema (the lock and the permit keyspaces)."""
    return tuple(
        f"{table}{suffix}" for suffix in ("", "_queue", "_permit_keys", "_permits", "_permit_queue")
    )


def _logged(table: str) -> str:
    """An expression: true when every table of the schema is logged (WAL-backed)."""
    names = ", ".join(f"to_regclass('{name}')" for name in tables(table))
    return f"NOT EXISTS (SELECT 1 FROM pg_class WHERE oid IN ({names}) AND relpersistence = 'u')"


def _set_logged(table: str) -> str:
    """Make every UNLOGGED table of the schema logged (a durable backend met tables that a
    default one created); a rewrite of each table, once."""
    changes = "\n".join(
        f"  IF (SELECT relpersistence FROM pg_class WHERE oid = to_regclass('{name}')) = 'u' THEN\n"
        f"    ALTER TABLE {name} SET LOGGED;\n  END IF;"
        for name in tables(table)
    )
    return f"DO $$ BEGIN\n{changes}\nEND $$"


def stored(key: str) -> bytes:
    """The key as stored (bytea: a namespaced key's NUL separator is kept exactly)."""
    return key.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Schema:
    """The statements for one table name (see the module's docstring)."""

    table: str
    ddl: tuple[str, ...]
    acquire: str
    release: str
    leave: str
    probe: str
    extend: str
    renew: str
    statistics: str
    truncate: str


def schema_for(table: str, *, durable: bool = False) -> Schema:
    """The schema and statements for *table* (``name`` or ``schema.name``, lower case).

    Unless *durable*, tables made by this schema are UNLOGGED, and acquire, release and
    give-up commit with ``synchronous_commit`` off for their own transaction
    (``set_config(..., true)`` in the statement: no session state, so a transaction-mode
    pooler and the caller's own pool are fine; it matters on logged tables only). *durable*:
    every table logged (made so if found UNLOGGED) and each commit flushed. What a crash
    ends, and why tokens still rise: the module's docstring."""
    if not isinstance(table, str):
        raise TypeError(f"PostgresBackend table must be a str, not {type(table).__name__}")
    found = _NAME.match(table)
    if found is None:
        raise ValueError(
            f"PostgresBackend table {table!r} is not a plain name: use lower-case letters, "
            "digits and underscores (at most 40), optionally prefixed by 'schema.'"
        )
    schema, name = found.groups()
    t = table
    kind = "TABLE" if durable else "UNLOGGED TABLE"  # tables made by this call
    q = f"{t}_queue"
    fn = t  # functions share the table's name as a prefix
    # the release mark: this owner id first, then the key's last few releasers
    mark = f"(ARRAY[p_owner] || released)[1:{_MARKS}]"
    lock = "PERFORM pg_advisory_xact_lock(hashtextextended(encode(p_key, 'hex'), 7262))"
    # the grant (or a claim of a key handed to p_owner): free, expired, or already ours. A
    # plain UPDATE of the key's row (an upsert would also lock the row it updates, or the
    # holder's when it refuses: one more write); else the holder is read (its expiry is
    # the reply), or a key never locked gets its first row. All under the key's lock, so
    # nothing changes hands between them (renewals only move the owner's own expiry)
    grant = f"""UPDATE {t} AS l SET owner = p_owner,
      token = CASE WHEN l.owner = p_owner THEN l.token ELSE {_mint("l.token")} END,
      expires_at = now_ + p_ttl_ms * interval '1 millisecond',
      took_over = CASE WHEN l.owner = p_owner THEN l.took_over ELSE l.owner IS NOT NULL END
    WHERE l.key = p_key AND (l.owner IS NULL OR l.expires_at <= now_ OR l.owner = p_owner)
    RETURNING l.token, l.took_over INTO o_token, o_took_over;
    IF NOT FOUND THEN
      SELECT * INTO holder FROM {t} WHERE key = p_key;
      IF NOT FOUND THEN
        INSERT INTO {t} (key, owner, token, expires_at)
        VALUES (p_key, p_owner, {_CLOCK_US}, now_ + p_ttl_ms * interval '1 millisecond')
        ON CONFLICT (key) DO NOTHING RETURNING token, took_over INTO o_token, o_took_over;
      END IF;
    END IF"""
    ddl = (
        *([f"CREATE SCHEMA IF NOT EXISTS {schema}"] if schema else []),
        f"""CREATE {kind} IF NOT EXISTS {t} (
  key bytea PRIMARY KEY,
  owner bytea,
  token bigint NOT NULL,
  expires_at timestamptz NOT NULL,
  took_over boolean NOT NULL DEFAULT false,
  released bytea[])""",
        f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS took_over boolean NOT NULL DEFAULT false",
        f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS released bytea[]",
        # an older version's functions: acquire's result and hand_off's arguments changed, which
        # CREATE OR REPLACE cannot do (dropped only then: a drop under running sessions fails
        # their cached plans)
        f"""DO $$ BEGIN
  IF to_regprocedure('{fn}_hand_off(bytea, timestamptz)') IS NOT NULL THEN
    DROP FUNCTION {fn}_hand_off(bytea, timestamptz);
    DROP FUNCTION IF EXISTS {fn}_acquire(bytea, bytea, bigint, boolean, bigint, bigint, text);
  END IF;
END $$""",
        f"""CREATE {kind} IF NOT EXISTS {q} (
  key bytea NOT NULL,
  owner bytea NOT NULL,
  arrived bigint NOT NULL,
  stay_until timestamptz NOT NULL,
  claim_ms bigint NOT NULL,
  channel text NOT NULL,
  PRIMARY KEY (key, owner))""",
        f"CREATE INDEX IF NOT EXISTS {name}_queue_line ON {q} (key, arrived, owner)",
        # the live head of a key's line; waiters whose stay ran out (dead) are dropped here
        f"""CREATE OR REPLACE FUNCTION {fn}_head(p_key bytea, p_now timestamptz)
RETURNS {q} LANGUAGE plpgsql AS $$
DECLARE
  head {q};
BEGIN
  LOOP
    SELECT * INTO head FROM {q} WHERE key = p_key ORDER BY arrived, owner LIMIT 1;
    IF NOT FOUND OR head.stay_until > p_now THEN
      RETURN head;
    END IF;
    DELETE FROM {q} WHERE key = p_key AND owner = head.owner;
  END LOOP;
END $$""",
        # the key is being given up: hand it to the live head of the line for the head's claim
        # window, and NOTIFY its process "<owner hex> <token> <server µs> <claim ms> <took>":
        # the head adopts the grant from the message (its renewer extends it to its TTL)
        # without a round trip of its own; or free it. p_took:
        # the lease given up was not released live (it lapsed first, or was an unused grant
        # that took over), so whoever gets the key next took it over: with nobody in line the
        # lease just ends, its owner kept, for the next grant to see
        f"""CREATE OR REPLACE FUNCTION {fn}_hand_off(p_key bytea, p_now timestamptz,
  p_took boolean) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  head {q} := {fn}_head(p_key, p_now);
  minted bigint;
BEGIN
  IF head.owner IS NULL THEN
    UPDATE {t} SET owner = CASE WHEN p_took THEN owner END, expires_at = p_now
    WHERE key = p_key;
    RETURN;
  END IF;
  UPDATE {t} SET owner = head.owner, token = {_mint("token")},
    expires_at = p_now + head.claim_ms * interval '1 millisecond', took_over = p_took
  WHERE key = p_key RETURNING token INTO minted;
  DELETE FROM {q} WHERE key = p_key AND owner = head.owner;
  PERFORM {_handed("p_now", "p_took")};
END $$""",
        # -> (1, token, ms left, took over) granted; (0, the server clock in µs, holder's ms
        # left or -2 when the key is free but promised to the head of the line, NULL) not
        # granted (queued if p_queue): the clock dates the hand-offs NOTIFYed to the caller.
        # A grant took the key over when the row's owner is another whose lease ran out
        f"""CREATE OR REPLACE FUNCTION {fn}_acquire(
  p_key bytea, p_owner bytea, p_ttl_ms bigint, p_queue boolean, p_stay_ms bigint,
  p_claim_ms bigint, p_channel text, OUT o_status int, OUT o_token bigint, OUT o_ms_left bigint,
  OUT o_took_over boolean)
LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  head {q};
  holder {t};
BEGIN
  {lock};
  SELECT * INTO head FROM {q} WHERE key = p_key ORDER BY arrived, owner LIMIT 1;
  IF FOUND AND head.stay_until <= now_ THEN
    head := {fn}_head(p_key, now_);
  END IF;
  IF head.owner IS NULL OR head.owner = p_owner THEN  -- nobody (alive) ahead of us
    {grant};
  ELSE  -- another waiter is first in line: only a key already handed to us is ours
    UPDATE {t} AS u SET expires_at = now_ + p_ttl_ms * interval '1 millisecond'
    WHERE u.key = p_key AND u.owner = p_owner AND u.expires_at > now_
    RETURNING u.token, u.took_over INTO o_token, o_took_over;
  END IF;
  IF o_token IS NOT NULL THEN
    IF head.owner IS NOT NULL THEN
      DELETE FROM {q} WHERE key = p_key AND owner = p_owner;
    END IF;
    o_status := 1;
    o_ms_left := p_ttl_ms;
    RETURN;
  END IF;
  o_status := 0;
  o_token := {_CLOCK_US};
  IF holder.key IS NULL THEN  -- not read above
    SELECT * INTO holder FROM {t} WHERE key = p_key;
  END IF;
  IF holder.owner IS NOT NULL AND holder.expires_at > now_ THEN
    o_ms_left := ceil(extract(epoch FROM holder.expires_at - now_) * 1000)::bigint;
  ELSE
    o_ms_left := -2;
  END IF;
  IF p_queue THEN
    INSERT INTO {q} (key, owner, arrived, stay_until, claim_ms, channel)
    VALUES (p_key, p_owner, {_CLOCK_US}, now_ + p_stay_ms * interval '1 millisecond',
            p_claim_ms, p_channel)
    ON CONFLICT (key, owner) DO UPDATE SET stay_until = excluded.stay_until;
  END IF;
END $$""",
        # -> true released (and handed on), or released already by this very call (a retry on a
        # new connection after the first attempt's reply was lost: the owner ids of the key's
        # last releases are kept in ``released``; owner ids are never reused); false it was
        # not ours, or it had expired (then the next holder took it over)
        f"""CREATE OR REPLACE FUNCTION {fn}_release(p_key bytea, p_owner bytea)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  head {q};
  minted bigint;
  live boolean;
BEGIN
  {lock};
  SELECT * INTO head FROM {q} WHERE key = p_key ORDER BY arrived, owner LIMIT 1;
  IF NOT FOUND THEN  -- the usual case, nobody in line: free the key in one update
    UPDATE {t} SET owner = NULL, expires_at = now_, released = {mark}
    WHERE key = p_key AND owner = p_owner AND expires_at > now_;
    IF FOUND THEN
      RETURN true;
    END IF;
  ELSIF head.stay_until > now_ THEN  -- a live waiter first in line: released and handed
    -- to it in one write (the release mark with the hand-off)
    UPDATE {t} SET owner = head.owner, token = {_mint("token")},
      expires_at = now_ + head.claim_ms * interval '1 millisecond', took_over = false,
      released = {mark}
    WHERE key = p_key AND owner = p_owner AND expires_at > now_ RETURNING token INTO minted;
    IF FOUND THEN
      DELETE FROM {q} WHERE key = p_key AND owner = head.owner;
      PERFORM {_handed("now_", "false")};
      RETURN true;
    END IF;
  END IF;
  SELECT expires_at > now_ INTO live FROM {t} WHERE key = p_key AND owner = p_owner;
  IF NOT FOUND THEN  -- not ours: a retry of our own release whose reply was lost finds its mark
    RETURN coalesce((SELECT p_owner = ANY(released) FROM {t} WHERE key = p_key), false);
  END IF;
  IF live THEN
    UPDATE {t} SET released = {mark} WHERE key = p_key;
  END IF;
  PERFORM {fn}_hand_off(p_key, now_, NOT live);
  RETURN live;
END $$""",
        # the caller gave up: out of the line; a key handed to it meanwhile is passed on
        f"""CREATE OR REPLACE FUNCTION {fn}_leave(p_key bytea, p_owner bytea)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  took boolean;
BEGIN
  {lock};
  DELETE FROM {q} WHERE key = p_key AND owner = p_owner;
  -- a grant given back unused passes on whether it took the key over (or had lapsed)
  SELECT took_over OR expires_at <= now_ INTO took FROM {t} WHERE key = p_key AND owner = p_owner;
  IF FOUND THEN
    PERFORM {fn}_hand_off(p_key, now_, took);
  END IF;
END $$""",
        # last: marks this version's statements as in place (the probe reads it)
        f"COMMENT ON FUNCTION {fn}_hand_off(bytea, timestamptz, boolean) IS '{_VERSION}'",
        *permit_ddl(t, name, kind),  # the permit keyspace (semaphores, RW locks): _permit_sql
        # durable: every table logged, whoever created it (never the other way: see persisted)
        *([_set_logged(t)] if durable else []),
    )
    # a filter (never false), so the rows keep their shape; it only has to run before the
    # commit. A filter rather than a second FROM item: no join, ~7 us less server time per pair
    fast = "" if durable else " WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL"
    return Schema(
        table=t,
        ddl=ddl,
        acquire=(
            f"SELECT o_status, o_token, o_ms_left, o_took_over "
            f"FROM {fn}_acquire(%s, %s, %s, %s, %s, %s, %s){fast}"
        ),
        release=f"SELECT {fn}_release(%s, %s){fast}",
        leave=f"SELECT {fn}_leave(%s, %s){fast}",
        # true once the statements above are in place (this version's, by its marker)
        probe=(
            f"SELECT coalesce(obj_description(to_regprocedure("
            f"'{fn}_hand_off(bytea, timestamptz, boolean)'), 'pg_proc') = '{_VERSION}', false) "
            f"AND {permit_probe(t)}{' AND ' + _logged(t) if durable else ''}"
        ),
        # -> one row if the live lease was ours (and now runs ttl ms from now)
        extend=(
            f"UPDATE {t} SET expires_at = clock_timestamp() + %s * interval '1 millisecond' "
            f"WHERE key = %s AND owner = %s AND token = %s AND expires_at > clock_timestamp() "
            f"RETURNING 1"
        ),
        # every due lease of one process in one statement -> the owners still holding theirs
        renew=(
            f"UPDATE {t} AS l SET expires_at = clock_timestamp() + r.ttl_ms * interval "
            f"'1 millisecond' FROM unnest(%s::bytea[], %s::bytea[], %s::bigint[]) "
            f"AS r(key, owner, ttl_ms) WHERE l.key = r.key AND l.owner = r.owner "
            f"AND l.expires_at > clock_timestamp() RETURNING l.owner"
        ),
        # -> (owner or NULL, last token, live, live waiters)
        statistics=(
            f"SELECT l.owner, l.token, coalesce(l.expires_at > clock_timestamp(), false), "
            f"(SELECT count(*) FROM {q} WHERE key = %s AND stay_until > clock_timestamp()) "
            f"FROM (SELECT 1) AS one LEFT JOIN {t} AS l ON l.key = %s"
        ),
        truncate=f"TRUNCATE {t}, {q}",
    )
