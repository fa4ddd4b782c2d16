"""The Postgres backend's permits (semaphores and RW locks): the schema and statements, every
decision about a permit key in one statement, beside the lock table and never mixed with it.

Three tables per lock ``table`` (the lock keyspace and the permit keyspace are separate):

* ``<table>_permit_keys``: one row per permit key ever used: ``lim`` (the key's capacity,
  recorded while anyone holds or waits, NULL once nobody does), ``token`` (the key's one
  counter, for every permit of every weight: it outlives the permits so tokens keep rising),
  ``lapsed`` (permits that ran out without their holder's release: each of the next grants
  takes over as many of them as its weight), ``released`` (the owner ids of the key's last
  few releases: a release sent again after its reply was lost answers "released").
* ``<table>_permits``: the permits held, one row per (key, owner): ``weight``,
  ``token``, ``expires_at`` (each permit lapses at its own TTL), ``took_over``.
* ``<table>_permit_queue``: the waiters in arrival order, whatever their weight, each with its
  process's channel and ``stay_until`` (refreshed at each of its tries; a dead waiter drops
  out of the line when it passes).

A grant needs the sum of the live weights plus its own to fit in ``lim``, and nobody in line
before it (FIFO across weights: a waiting writer blocks the readers that come after it; a try
is granted only when nobody waits). Whenever capacity frees (a release, a lapse found, a waiter
leaving), the heads of the line that now fit are granted in order, several at once if they fit
(readers behind a writer), each NOTIFYed on its process's channel with the grant, in the
lock path's format ``<owner hex> <token> <server µs> <claim ms> <took>``, so one listener per
process serves locks and permits alike.

Every function first takes ``pg_advisory_xact_lock`` on the key's hash (another seed than the
lock path's: the keyspaces never wait on each other), so all decisions about one key are
serialized and nothing outlives the statement (a transaction-mode pooler is fine). Tokens are
``max(last + 1, server clock in µs)`` as on the lock path. Durability as on the lock path (see
``_sql``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PermitSchema", "permit_ddl", "permit_probe", "permit_schema_for"]

_VERSION = "keylock permits 2"
_MARKS = 4  # a key's last releasers remembered (see _sql)
_CLOCK_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
_MS = "* interval '1 millisecond'"
_SPARE = 8  # free permit slots a key keeps beyond twice its holders (reused, not re-inserted)
# the signature the version marker is written on (the probe reads it)
_MARKED = "_permit_heads(bytea, timestamptz, bytea, bigint)"


def _mint(last: str) -> str:
    return f"greatest({last} + 1, {_CLOCK_US})"


def permit_probe(table: str) -> str:
    """An expression: true once this version's permit statements are in place."""
    return (
        f"coalesce(obj_description(to_regprocedure('{table}{_MARKED}'), 'pg_proc') "
        f"= '{_VERSION}', false)"
    )


def permit_ddl(table: str, name: str, kind: str = "UNLOGGED TABLE") -> tuple[str, ...]:
    """The permit tables and functions beside lock table *table* (*name*: without schema);
    *kind*: ``TABLE`` or ``UNLOGGED TABLE``, how tables made now are made."""
    t = table
    k, p, q = f"{t}_permit_keys", f"{t}_permits", f"{t}_permit_queue"
    lock = "PERFORM pg_advisory_xact_lock(hashtextextended(encode(p_key, 'hex'), 7263))"
    return (
        f"""CREATE {kind} IF NOT EXISTS {k} (
  key bytea PRIMARY KEY,
  lim bigint,
  token bigint NOT NULL,
  lapsed bigint NOT NULL DEFAULT 0,
  released bytea[])""",
        f"""CREATE {kind} IF NOT EXISTS {p} (
  key bytea NOT NULL,
  slot int NOT NULL,
  owner bytea,
  token bigint NOT NULL,
  weight bigint NOT NULL,
  expires_at timestamptz NOT NULL,
  took_over boolean NOT NULL,
  PRIMARY KEY (key, slot))""",
        # a permit goes in the first free slot of its key (a new one if none is free)
        f"""CREATE OR REPLACE FUNCTION {t}_permit_put(p_key bytea, p_owner bytea,
  p_token bigint, p_weight bigint, p_expires timestamptz, p_took boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  UPDATE {p} SET owner = p_owner, token = p_token, weight = p_weight,
    expires_at = p_expires, took_over = p_took
  WHERE key = p_key AND slot = (SELECT min(slot) FROM {p} WHERE key = p_key AND owner IS NULL);
  IF NOT FOUND THEN
    INSERT INTO {p} (key, slot, owner, token, weight, expires_at, took_over)
    SELECT p_key, coalesce(max(slot), -1) + 1, p_owner, p_token, p_weight, p_expires, p_took
    FROM {p} WHERE key = p_key;
  END IF;
END $$""",
        f"""CREATE {kind} IF NOT EXISTS {q} (
  key bytea NOT NULL,
  owner bytea NOT NULL,
  weight bigint NOT NULL,
  arrived bigint NOT NULL,
  stay_until timestamptz NOT NULL,
  claim_ms bigint NOT NULL,
  channel text NOT NULL,
  PRIMARY KEY (key, owner))""",
        f"CREATE INDEX IF NOT EXISTS {name}_permit_queue_line ON {q} (key, arrived, owner)",
        # grant the heads of the line that fit, in order, until one does not (it blocks the
        # rest); the caller p_self, if granted, gets its TTL and no NOTIFY (it is answered)
        f"""CREATE OR REPLACE FUNCTION {t}_permit_heads(p_key bytea, p_now timestamptz,
  p_self bytea, p_ttl_ms bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  rec {k};
  used bigint;
  head {q};
  took boolean;
  ms bigint;
  granted boolean := false;
BEGIN
  SELECT * INTO rec FROM {k} WHERE key = p_key;
  SELECT coalesce(sum(weight), 0) INTO used FROM {p} WHERE key = p_key AND owner IS NOT NULL;
  LOOP
    SELECT * INTO head FROM {q} WHERE key = p_key ORDER BY arrived, owner LIMIT 1;
    EXIT WHEN NOT FOUND;
    IF head.stay_until <= p_now THEN  -- a dead waiter: out of the line
      DELETE FROM {q} WHERE key = p_key AND owner = head.owner;
      CONTINUE;
    END IF;
    EXIT WHEN rec.lim IS NULL OR used + head.weight > rec.lim;
    rec.token := {_mint("rec.token")};
    took := rec.lapsed > 0;
    rec.lapsed := rec.lapsed - least(rec.lapsed, head.weight);
    ms := CASE WHEN head.owner = p_self THEN p_ttl_ms ELSE head.claim_ms END;
    PERFORM {t}_permit_put(p_key, head.owner, rec.token, head.weight, p_now + ms {_MS}, took);
    DELETE FROM {q} WHERE key = p_key AND owner = head.owner;
    used := used + head.weight;
    granted := true;
    IF head.owner IS DISTINCT FROM p_self THEN
      PERFORM pg_notify(head.channel, concat_ws(' ', encode(head.owner, 'hex'), rec.token,
        (extract(epoch FROM p_now) * 1000000)::bigint, head.claim_ms, took::int));
    END IF;
  END LOOP;
  IF granted THEN
    UPDATE {k} SET token = rec.token, lapsed = rec.lapsed WHERE key = p_key;
  END IF;
END $$""",
        # after a permit or a waiter went: drop the lapsed permits (counted: the next grants
        # took them over) and the dead waiters, grant the heads that now fit, and forget the
        # limit once nobody holds or waits. p_lapsed: the permit that went had lapsed (or was
        # an unused grant that took over); p_mark: the owner id of a live release
        f"""CREATE OR REPLACE FUNCTION {t}_permit_settle(p_key bytea, p_now timestamptz,
  p_lapsed bigint, p_mark bytea) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  n_lapsed bigint;
  held bigint;
  slots bigint;
  dead bigint;
  waiting bigint;
BEGIN
  SELECT s.n_lapsed, s.held, s.slots, w.dead, w.waiting
  INTO n_lapsed, held, slots, dead, waiting
  FROM (SELECT count(*) FILTER (WHERE owner IS NOT NULL AND expires_at <= p_now) AS n_lapsed,
      count(owner) AS held, count(*) AS slots FROM {p} WHERE key = p_key) AS s,
    (SELECT count(*) FILTER (WHERE stay_until <= p_now) AS dead, count(*) AS waiting
      FROM {q} WHERE key = p_key) AS w;
  IF n_lapsed > 0 THEN
    UPDATE {p} SET owner = NULL
    WHERE key = p_key AND owner IS NOT NULL AND expires_at <= p_now;
  END IF;
  IF slots > {_SPARE} + 2 * (held - n_lapsed) THEN  -- many more slots than holders: trim
    DELETE FROM {p} WHERE key = p_key AND owner IS NULL
      AND slot >= {_SPARE} + 2 * (held - n_lapsed);
  END IF;
  IF dead > 0 THEN
    DELETE FROM {q} WHERE key = p_key AND stay_until <= p_now;
  END IF;
  UPDATE {k} SET lapsed = lapsed + n_lapsed + p_lapsed,
    released = CASE WHEN p_mark IS NULL THEN released
      ELSE (ARRAY[p_mark] || released)[1:{_MARKS}] END,
    lim = CASE WHEN held = n_lapsed AND waiting = dead THEN NULL ELSE lim END
  WHERE key = p_key;
  IF waiting > dead THEN
    PERFORM {t}_permit_heads(p_key, p_now, NULL, 0);
  END IF;
END $$""",
        # -> (1, token, ms left, took over) granted; (0, the server clock in µs, ms until the
        # first permit held lapses or -2 when none is held, NULL) not granted (queued if
        # p_queue); (-1, the key's recorded limit, NULL, NULL): another limit is in use.
        # The usual case (nobody in line, it fits) is one read and one write
        f"""CREATE OR REPLACE FUNCTION {t}_permit_acquire(p_key bytea, p_owner bytea,
  p_limit bigint, p_weight bigint, p_ttl_ms bigint, p_queue boolean, p_stay_ms bigint,
  p_claim_ms bigint, p_channel text, OUT o_status int, OUT o_token bigint,
  OUT o_ms_left bigint, OUT o_took_over boolean)
LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  v_lim bigint;
  last bigint;
  v_lapsed bigint;
  used bigint;
  held bigint;
  n_lapsed bigint;
  mine boolean;
  free int;
  top int;
  dead bigint;
  waiting bigint;
BEGIN
  {lock};
  SELECT r.lim, coalesce(r.token, 0), coalesce(r.lapsed, 0), s.n_lapsed, s.used, s.held,
    s.mine, s.free, s.top, w.dead, w.waiting
  INTO v_lim, last, v_lapsed, n_lapsed, used, held, mine, free, top, dead, waiting
  FROM (SELECT count(*) FILTER (WHERE owner IS NOT NULL AND expires_at <= now_) AS n_lapsed,
      coalesce(sum(weight) FILTER (WHERE owner IS NOT NULL AND expires_at > now_), 0) AS used,
      count(*) FILTER (WHERE owner IS NOT NULL AND expires_at > now_) AS held,
      coalesce(bool_or(owner = p_owner AND expires_at > now_), false) AS mine,
      min(slot) FILTER (WHERE owner IS NULL OR expires_at <= now_) AS free,
      coalesce(max(slot), -1) AS top
      FROM {p} WHERE key = p_key) AS s
    CROSS JOIN (SELECT count(*) FILTER (WHERE stay_until <= now_) AS dead, count(*) AS waiting
      FROM {q} WHERE key = p_key) AS w
    LEFT JOIN {k} AS r ON r.key = p_key;
  IF mine THEN  -- handed to us while we came back, or a try whose reply was lost
    UPDATE {p} SET expires_at = now_ + p_ttl_ms {_MS} WHERE key = p_key AND owner = p_owner
    RETURNING token, took_over INTO o_token, o_took_over;
    DELETE FROM {q} WHERE key = p_key AND owner = p_owner;
    o_status := 1;
    o_ms_left := p_ttl_ms;
    RETURN;
  END IF;
  IF n_lapsed > 0 THEN  -- their holders died or froze: the next grants took them over
    UPDATE {p} SET owner = NULL
    WHERE key = p_key AND owner IS NOT NULL AND expires_at <= now_;
    v_lapsed := v_lapsed + n_lapsed;
  END IF;
  IF dead > 0 THEN  -- waiters that stopped coming back: out of the line
    DELETE FROM {q} WHERE key = p_key AND stay_until <= now_;
    waiting := waiting - dead;
  END IF;
  IF held = 0 AND waiting = 0 THEN
    v_lim := p_limit;  -- nobody holds or waits: this request records the limit
  ELSIF v_lim <> p_limit THEN
    UPDATE {k} SET lapsed = v_lapsed WHERE key = p_key;
    IF waiting > 0 THEN
      PERFORM {t}_permit_heads(p_key, now_, NULL, 0);
    END IF;
    o_status := -1;
    o_token := v_lim;
    RETURN;
  END IF;
  IF waiting > 0 THEN  -- the heads that fit go first (this caller among them if in line)
    UPDATE {k} SET lapsed = v_lapsed WHERE key = p_key;
    PERFORM {t}_permit_heads(p_key, now_, p_owner, p_ttl_ms);
    SELECT token, took_over INTO o_token, o_took_over FROM {p}
    WHERE key = p_key AND owner = p_owner;
    IF FOUND THEN
      o_status := 1;
      o_ms_left := p_ttl_ms;
      RETURN;
    END IF;
    -- the heads took tokens, lapses and slots
    SELECT r.token, r.lapsed INTO last, v_lapsed FROM {k} AS r WHERE r.key = p_key;
    SELECT count(*) INTO waiting FROM {q} WHERE key = p_key;
    SELECT coalesce(sum(weight) FILTER (WHERE owner IS NOT NULL), 0),
      min(slot) FILTER (WHERE owner IS NULL), coalesce(max(slot), -1)
    INTO used, free, top FROM {p} WHERE key = p_key;
  END IF;
  IF waiting = 0 AND used + p_weight <= v_lim THEN
    o_token := {_mint("last")};
    o_took_over := v_lapsed > 0;
    IF free IS NULL THEN
      INSERT INTO {p} (key, slot, owner, token, weight, expires_at, took_over)
      VALUES (p_key, top + 1, p_owner, o_token, p_weight, now_ + p_ttl_ms {_MS}, o_took_over);
    ELSE
      UPDATE {p} SET owner = p_owner, token = o_token, weight = p_weight,
        expires_at = now_ + p_ttl_ms {_MS}, took_over = o_took_over
      WHERE key = p_key AND slot = free;
    END IF;
    INSERT INTO {k} AS r (key, lim, token, lapsed)
    VALUES (p_key, v_lim, o_token, v_lapsed - least(v_lapsed, p_weight))
    ON CONFLICT (key) DO UPDATE SET lim = excluded.lim, token = excluded.token,
      lapsed = excluded.lapsed;
    o_status := 1;
    o_ms_left := p_ttl_ms;
    RETURN;
  END IF;
  o_status := 0;
  o_token := {_CLOCK_US};
  SELECT ceil(extract(epoch FROM min(expires_at) - now_) * 1000)::bigint INTO o_ms_left
  FROM {p} WHERE key = p_key AND owner IS NOT NULL;
  o_ms_left := coalesce(o_ms_left, -2);
  IF p_queue THEN
    INSERT INTO {k} AS r (key, lim, token, lapsed) VALUES (p_key, v_lim, last, v_lapsed)
    ON CONFLICT (key) DO UPDATE SET lim = excluded.lim, lapsed = excluded.lapsed;
    INSERT INTO {q} (key, owner, weight, arrived, stay_until, claim_ms, channel)
    VALUES (p_key, p_owner, p_weight, {_CLOCK_US}, now_ + p_stay_ms {_MS}, p_claim_ms,
            p_channel)
    ON CONFLICT (key, owner) DO UPDATE SET stay_until = excluded.stay_until;
  ELSIF n_lapsed > 0 THEN
    UPDATE {k} SET lapsed = v_lapsed WHERE key = p_key;
  END IF;
END $$""",
        # -> true released (and the heads that now fit granted), or released already by this
        # very call (a retry after its reply was lost finds its mark); false: not ours, or it
        # had lapsed (then the next grant took it over)
        f"""CREATE OR REPLACE FUNCTION {t}_permit_release(p_key bytea, p_owner bytea,
  p_token bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  live boolean;
BEGIN
  {lock};
  UPDATE {p} SET owner = NULL WHERE key = p_key AND owner = p_owner AND token = p_token
  RETURNING expires_at > now_ INTO live;
  IF NOT FOUND THEN
    RETURN coalesce((SELECT p_owner = ANY(released) FROM {k} WHERE key = p_key), false);
  END IF;
  PERFORM {t}_permit_settle(p_key, now_, CASE WHEN live THEN 0 ELSE 1 END,
    CASE WHEN live THEN p_owner END);
  RETURN live;
END $$""",
        # the caller gave up: out of the line (which may let the waiters behind it in), and a
        # permit granted to it meanwhile is passed on (with its took-over, if it had one)
        f"""CREATE OR REPLACE FUNCTION {t}_permit_leave(p_key bytea, p_owner bytea)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  now_ timestamptz := clock_timestamp();
  took boolean;
BEGIN
  {lock};
  DELETE FROM {q} WHERE key = p_key AND owner = p_owner;
  UPDATE {p} SET owner = NULL WHERE key = p_key AND owner = p_owner
  RETURNING took_over OR expires_at <= now_ INTO took;
  PERFORM {t}_permit_settle(p_key, now_, CASE WHEN took THEN 1 ELSE 0 END, NULL);
END $$""",
        # -> (recorded limit, the newest live holder's owner and token, live permits, their
        # weight, live waiters)
        f"""CREATE OR REPLACE FUNCTION {t}_permit_statistics(p_key bytea, OUT o_limit bigint,
  OUT o_owner bytea, OUT o_token bigint, OUT o_holders bigint, OUT o_used bigint,
  OUT o_waiting bigint) LANGUAGE sql STABLE AS $$
SELECT (SELECT lim FROM {k} WHERE key = p_key), h.owner, h.token,
  (SELECT count(owner) FROM {p} WHERE key = p_key AND expires_at > clock_timestamp()),
  (SELECT coalesce(sum(weight) FILTER (WHERE owner IS NOT NULL), 0) FROM {p}
   WHERE key = p_key AND expires_at > clock_timestamp()),
  (SELECT count(*) FROM {q} WHERE key = p_key AND stay_until > clock_timestamp())
FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT owner, token FROM {p} WHERE key = p_key
  AND owner IS NOT NULL AND expires_at > clock_timestamp() ORDER BY token DESC LIMIT 1) AS h
  ON true
$$""",
        # last: marks this version's statements as in place (the probe reads it)
        f"COMMENT ON FUNCTION {t}{_MARKED} IS '{_VERSION}'",
    )


@dataclass(frozen=True)
class PermitSchema:
    """The permit statements for one lock table name (see the module's docstring)."""

    table: str
    acquire: str
    release: str
    leave: str
    extend: str
    renew: str
    statistics: str


def permit_schema_for(table: str, *, durable: bool = False) -> PermitSchema:
    """The permit statements beside lock table *table* (validated by ``_sql.schema_for``)."""
    t = table
    p = f"{t}_permits"
    fast = "" if durable else "set_config('synchronous_commit', 'off', true) AS fast"
    ttl = "clock_timestamp() + %s * interval '1 millisecond'"
    return PermitSchema(
        table=t,
        acquire=(
            f"SELECT o_status, o_token, o_ms_left, o_took_over FROM "
            f"{t}_permit_acquire(%s, %s, %s, %s, %s, %s, %s, %s, %s){fast and ', ' + fast}"
        ),
        release=f"SELECT {t}_permit_release(%s, %s, %s){fast and ' FROM ' + fast}",
        leave=f"SELECT {t}_permit_leave(%s, %s){fast and ' FROM ' + fast}",
        # -> one row if the live permit was ours (and now runs ttl ms from now)
        extend=(
            f"UPDATE {p} SET expires_at = {ttl} WHERE key = %s AND owner = %s AND token = %s "
            f"AND expires_at > clock_timestamp() RETURNING 1"
        ),
        # every due lease of one process, locks and permits, in one statement -> the owners
        # still holding theirs (owner ids are per lease, never shared by a lock and a permit)
        renew=(
            f"WITH r AS (SELECT * FROM unnest(%s::bytea[], %s::bytea[], %s::bigint[]) "
            f"AS r(key, owner, ttl_ms)), "
            f"a AS (UPDATE {t} AS l SET expires_at = clock_timestamp() + r.ttl_ms "
            f"* interval '1 millisecond' FROM r WHERE l.key = r.key AND l.owner = r.owner "
            f"AND l.expires_at > clock_timestamp() RETURNING l.owner), "
            f"b AS (UPDATE {p} AS l SET expires_at = clock_timestamp() + r.ttl_ms "
            f"* interval '1 millisecond' FROM r WHERE l.key = r.key AND l.owner = r.owner "
            f"AND l.expires_at > clock_timestamp() RETURNING l.owner) "
            f"SELECT owner FROM a UNION ALL SELECT owner FROM b"
        ),
        statistics=(
            f"SELECT o_limit, o_owner, o_token, o_holders, o_used, o_waiting "
            f"FROM {t}_permit_statistics(%s)"
        ),
    )
