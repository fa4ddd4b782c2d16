"""The uncontended paths of the permit scripts (see :mod:`._permit_scripts`), run before
the general path's prelude.

The prelude builds about twenty closures and two tables on every call; on a key nobody
waits for, an acquire and a release need none of them. Each text below is a prefix of its
script: it handles one common state with the same effects as the general path would have
(the same fields, values and TTLs), and returns; in any other state it falls through to the
general path, having written nothing. TAKEOVER_MS and FENCE_SLACK are filled in by
``_permit_scripts``.
"""

from __future__ import annotations

__all__ = ["FAST_ACQUIRE", "FAST_RELEASE"]

# ACQUIRE when nobody holds (so nothing can have expired, and a recorded limit is stale), nobody
# waits, the weight fits, and this caller never left: load, grant, keep and finish, written out,
# with the holder kept in fixed fields of the record (``solo``) rather than in a holders zset.
FAST_ACQUIRE = """
-- The common case first, before the prelude makes its closures and tables: nobody holds (so
-- nothing can have expired, and a recorded limit is stale), nobody waits, and this caller
-- never left. The same steps as the general path below (load, grant, keep, finish) for that
-- state, written out, except that the lone holder goes in fixed fields of the record (solo:
-- its owner, solo_rec: its o: record, solo_expires: its expiry) instead of an o: field and
-- a holders zset of its own: nothing to make, arm and delete again, and the record's fields
-- are overwritten in place. The prelude's load() moves it to an o: field and the zset
-- before anything else can happen. The line, 0 already, is not written.
local v = redis.call('HMGET', KEYS[1], 'used', 'line', 'fence', 'lapsed', 'until',
  'o:' .. ARGV[1])
if (v[1] or '0') == '0' and (v[2] or '0') == '0' and not v[6]
    and tonumber(ARGV[8]) <= tonumber(ARGV[7]) and redis.call('EXISTS', KEYS[5]) == 0 then
  local now = redis.call('TIME')
  local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local now_ms = math.floor(clock / 1000)
  local weight = tonumber(ARGV[8])
  local lapsed = tonumber(v[4] or '0')
  local took = '0'
  local token = string.format('%.0f', math.max(tonumber(v[3] or '0') + 1, clock))
  local expires = now_ms + tonumber(ARGV[2])
  if lapsed > 0 then
    took = '1'
    lapsed = lapsed - math.min(lapsed, weight)
  end
  local until_ms = tonumber(v[5] or '0')
  local rearm = expires > until_ms
  if rearm then until_ms = expires + 3600000 end
  -- (whole ms below 2^53 go to redis.call as numbers: Redis writes them as integers,
  -- exactly, without a string.format each; the token is written out once, for its record.
  -- No table is built: every one is garbage for Lua's collector, which runs between calls)
  redis.call('HSET', KEYS[1], 'limit', ARGV[7], 'used', weight, 'fence', token, 'solo', ARGV[1],
    'solo_rec', token .. ' ' .. weight .. ' ' .. took, 'solo_expires', expires,
    'lapsed', lapsed, 'until', until_ms)
  if rearm then redis.call('PEXPIRE', KEYS[1], until_ms - now_ms + TAKEOVER_MS) end
  return {1, token, tonumber(ARGV[2]), tonumber(took)}
end
"""

# RELEASE when the caller holds a live permit and nobody waits: drop, tidy and finish.
FAST_RELEASE = """
-- The common case first, before the prelude makes its closures and tables: the caller holds
-- a live permit and nobody waits. The same steps as the general path below (drop, tidy,
-- finish) for that state, written out. The lone holder of FAST_ACQUIRE (solo) leaves by
-- blanking solo in the HSET of the counters; any other by HDEL and ZREM too.
local v = redis.call('HMGET', KEYS[1], 'used', 'line', 'lapsed', 'o:' .. ARGV[1], 'solo',
  'solo_rec', 'solo_expires')
local solo = v[5] == ARGV[1]
local record, expiry = v[4], nil
if solo then record, expiry = v[6], v[7] end
if record and (v[2] or '0') == '0' then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if not solo then expiry = redis.call('ZSCORE', KEYS[2], ARGV[1]) end
  if expiry and tonumber(expiry) >= now_ms then  -- (live through its ms: see purge)
    local used = 0  -- (a lone holder is the only one)
    if not solo then
      used = tonumber(v[1] or '0') - tonumber(string.match(record, '^%d+ (%d+)'))
    end
    if not solo then
      redis.call('HDEL', KEYS[1], 'o:' .. ARGV[1])
      redis.call('ZREM', KEYS[2], ARGV[1])
    end
    redis.call('SET', KEYS[5], '1', 'PX', ARGV[3])
    -- solo is blanked in every case: when another holder leaves, it is blank already (a lone
    -- holder is the only one)
    if used > 0 then
      redis.call('HSET', KEYS[1], 'used', used, 'solo', '')
    elseif (v[3] or '0') ~= '0' then  -- lapsed permits to tell a next holder: keep the TTL
      redis.call('HSET', KEYS[1], 'limit', 0, 'used', 0, 'solo', '')
    else  -- nothing to tell a next holder: only the counter, a while
      redis.call('HSET', KEYS[1], 'limit', 0, 'used', 0, 'until', 0, 'solo', '')
      redis.call('PEXPIRE', KEYS[1], FENCE_SLACK)
    end
    return 1
  end
end
"""
