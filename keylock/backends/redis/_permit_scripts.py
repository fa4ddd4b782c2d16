"""The Lua scripts of Redis permits (semaphores, RW locks), with their KEYS/ARGV headers.

A permit key has a capacity, its *limit*; a permit takes a *weight* of it (1, or the whole
limit for an RW writer). Each script runs atomically, and each is safe to run twice (a retry
after a lost reply): they look the caller up by its owner id before they act.

Every script gets the five keys of one permit key (``Layout.permit``: one hash tag, so one
Cluster slot): KEYS[1] the record (hash: ``limit`` while anyone holds or waits, ``used`` the
weight held, ``fence`` the last token, ``lapsed`` permits that expired unreleased and were not
taken over yet, ``o:<owner>`` -> ``"<token> <weight> <took over 0|1>"`` per holder, and
``solo``/``solo_rec``/``solo_expires``: the lone holder of an uncontended grant, its record and
expiry, until ``load`` moves it to an ``o:`` field and KEYS[2]; ``''``: none), KEYS[2] the
holders (zset owner -> expiry, server ms: a holder that stops renewing loses its permit at its
own TTL; it is live through that ms, as Redis keeps a key set with PX), KEYS[3] the line
(zset owner -> arrival, server µs), KEYS[4] the waiters' entries (hash owner -> ``"<deadline
ms> <claim ms> <weight> <channel>"``), KEYS[5] the caller's departure mark. PERMIT_EXTEND
and PERMIT_STATS take fewer (see each).

- Capacity: a permit is granted only while the weights held, its own included, fit in the
  limit; expired holders are dropped first (their weight frees).
- FIFO across weights: the caller is granted only when no live waiter is ahead of it; the
  line is served in order and stops at the first waiter that does not fit, so a waiting writer
  blocks the readers behind it. A try (no wait) is granted only when the line is empty.
- One token counter per permit key: max(last + 1, server clock in µs), as for locks.
- The limit: a request whose limit differs from the one recorded while anyone holds or waits
  gets ``{-1, recorded limit}`` and changes nothing; the record goes with the last holder and
  waiter.
- Hand-off: whenever capacity frees (a release, a waiter leaving, an expired holder dropped),
  the heads of the line that now fit are granted, each for its claim window, and each is told
  on its process's channel with the lock path's message (``_listener.parse_hand_off``), one
  message per waiter, so several waiters of one process all wake.
- took_over: a permit that lapsed (dropped expired, never released) is counted; the next grant
  takes it over (``took`` 1) and uses up as many of them as its weight (a writer: all). A
  grant given back unused (LEAVE) passes its own took_over on.
"""

from __future__ import annotations

from ._permit_fast import FAST_ACQUIRE, FAST_RELEASE
from ._scripts import FENCE_SLACK_MS, TAKEOVER_MARK_MS, _script

__all__ = [
    "MISMATCH",
    "PERMIT_ACQUIRE",
    "PERMIT_EXTEND",
    "PERMIT_LEAVE",
    "PERMIT_RELEASE",
    "PERMIT_STATS",
]

MISMATCH = -1  # the first element of PERMIT_ACQUIRE's reply when the limits disagree

_PRELUDE = """
local clock, now_ms
local function tick()  -- the server clock, read once per script
  if not clock then
    local now = redis.call('TIME')
    clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
    now_ms = math.floor(clock / 1000)
  end
end
local function fmt(n) return string.format('%.0f', n) end
-- The record's counters, read once (load) and written once (finish): limit (0: no record),
-- used, fence, lapsed, line (entries in the line: 0 spares a look at it; more is only a hint,
-- set right at the next look), and until (the record and holders are kept past every expiry
-- up to it, plus the took_over window: most grants need not re-arm their TTLs).
local S = {dirty = false}
local writes = {}  -- holder records to write with the counters
local function put(field, value)
  writes[#writes + 1] = field
  writes[#writes + 1] = value
  if #writes >= 400 then  -- (unpack has a bound: a hand-off to thousands of readers)
    redis.call('HSET', KEYS[1], unpack(writes))
    writes = {}
  end
end
local function load(owner)
  local v = redis.call('HMGET', KEYS[1], 'limit', 'used', 'fence', 'lapsed', 'until', 'line',
    'o:' .. owner, 'solo', 'solo_expires', 'solo_rec')
  S.limit = tonumber(v[1] or '0')
  S.used = tonumber(v[2] or '0')
  S.fence = tonumber(v[3] or '0')
  S.lapsed = tonumber(v[4] or '0')
  S.until_ms = tonumber(v[5] or '0')
  S.line = tonumber(v[6] or '0')
  if v[8] and v[8] ~= '' then  -- FAST_ACQUIRE's lone holder: stored as every other holder
    tick()
    redis.call('ZADD', KEYS[2], v[9], v[8])
    redis.call('HSET', KEYS[1], 'o:' .. v[8], v[10])
    redis.call('HDEL', KEYS[1], 'solo', 'solo_expires', 'solo_rec')
    S.expire_holders = math.max(S.until_ms - now_ms + TAKEOVER_MS, 1)  -- (a new zset)
    if v[8] == owner then return v[10] end
  end
  return v[7]
end
local function finish()  -- write the counters back, then the TTLs (a new hash exists by then)
  if S.dirty then
    redis.call('HSET', KEYS[1], 'limit', S.limit, 'used', S.used, 'fence', fmt(S.fence),
      'lapsed', S.lapsed, 'until', fmt(S.until_ms), 'line', S.line, unpack(writes))
  end
  if S.expire then redis.call('PEXPIRE', KEYS[1], fmt(S.expire)) end
  if S.expire_holders then redis.call('PEXPIRE', KEYS[2], fmt(S.expire_holders)) end
  if S.at_least and redis.call('PTTL', KEYS[1]) < S.at_least then
    redis.call('PEXPIRE', KEYS[1], S.at_least)
  end
end
local function weight_of(record) return tonumber(string.match(record, '^%d+ (%d+)')) end
local function drop(owner, record)  -- a holder leaves: its weight frees
  S.used = S.used - weight_of(record)
  S.dirty = true
  redis.call('HDEL', KEYS[1], 'o:' .. owner)
  redis.call('ZREM', KEYS[2], owner)
end
-- Holders whose permit expired: dropped, and counted as lapsed. A permit that expires at E ms
-- is live through ms E (expired once the clock, in whole ms, is past it, as a key with PX):
-- it was granted at floor(t) ms <= t, and dropping it at E would cut up to 1 ms off the TTL
-- that its client counts from before it sent the request.
local function purge()
  tick()
  if S.used == 0 then return {} end  -- (no holder at all)
  local cut = '(' .. fmt(now_ms)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cut)
  if #gone == 0 then return gone end
  for _, owner in ipairs(gone) do
    local record = redis.call('HGET', KEYS[1], 'o:' .. owner)
    if record then
      S.used = S.used - weight_of(record)
      redis.call('HDEL', KEYS[1], 'o:' .. owner)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cut)
  S.lapsed = S.lapsed + #gone
  S.dirty = true
  return gone
end
local function unqueue(owner)  -- take *owner* out of the line
  if redis.call('ZREM', KEYS[3], owner) == 1 then
    S.line = math.max(S.line - 1, 0)
    S.dirty = true
  end
  redis.call('HDEL', KEYS[4], owner)
end
local function live_head()  -- (waiters that stopped coming back leave the line)
  if S.line == 0 then return nil, nil end
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  while head do
    tick()
    local entry = redis.call('HGET', KEYS[4], head)
    if entry and tonumber(string.match(entry, '^%d+')) > now_ms then return head, entry end
    unqueue(head)
    head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  end
  S.line = 0
  S.dirty = true
  return nil, nil
end
local function fits(weight)
  return S.used + weight <= S.limit
end
local function keep(expires, fresh)  -- the record outlives every expiry by the took_over window
  if expires > S.until_ms then
    S.until_ms = expires + 3600000
    S.expire = S.until_ms - now_ms + TAKEOVER_MS
    S.expire_holders = S.expire
  elseif fresh then  -- a new holders zset: no TTL of its own yet
    S.expire_holders = S.until_ms - now_ms + TAKEOVER_MS
  end
end
local function grant(owner, weight, expires)
  tick()
  local took = '0'
  if S.lapsed > 0 then
    took = '1'
    S.lapsed = S.lapsed - math.min(S.lapsed, weight)  -- a writer takes over every lapsed permit
  end
  S.fence = math.max(S.fence + 1, clock)
  local token = fmt(S.fence)
  local fresh = S.used == 0
  S.used = S.used + weight
  S.dirty = true
  put('o:' .. owner, token .. ' ' .. weight .. ' ' .. took)
  redis.call('ZADD', KEYS[2], fmt(expires), owner)
  keep(expires, fresh)
  return token, took
end
-- Serve the line: grant its live heads in order while they fit; each is told on its own
-- process's channel, except *caller* (its script's reply tells it). Returns whether the caller
-- was served, and whether a waiter that does not fit is left at the head.
local function serve(key, caller)
  while true do
    local head, entry = live_head()
    if not head then return false, false end
    local claim_ms, weight, channel = string.match(entry, '^%d+ (%d+) (%d+) (.*)$')
    weight = tonumber(weight)
    if not fits(weight) then return false, true end
    unqueue(head)
    if head == caller then return true, false end
    -- the waiter gets its permit for its claim window only (its renewer, or its acquire,
    -- extends it to the full TTL): one that died in line holds it that long
    local token, took = grant(head, weight, now_ms + tonumber(claim_ms))
    -- a permit that took one over is announced with a claim of 0 ms: the waiter asks with
    -- its acquire, whose reply says took_over. The key goes last (it may contain NUL).
    local shown = took == '1' and '0' or claim_ms
    redis.call('PUBLISH', channel, token .. ' ' .. fmt(clock) .. ' ' .. shown .. ' ' .. head .. key)
  end
end
local function tidy(line_empty)  -- nobody holds or waits: forget the limit; keep the counter
  if S.used == 0 and (line_empty or not live_head()) then
    S.limit = 0
    S.dirty = true
    if S.lapsed == 0 then  -- nothing to tell a next holder: only the counter, a while
      S.until_ms = 0
      S.expire = FENCE_SLACK
    end
  end
end
local function gone_with(gone, owner, record)  -- *record*, unless purge just dropped it
  for _, who in ipairs(gone) do
    if who == owner then return nil end
  end
  return record
end
"""

_PRELUDE = _PRELUDE.replace("TAKEOVER_MS", str(TAKEOVER_MARK_MS)).replace(
    "FENCE_SLACK", str(FENCE_SLACK_MS)
)

# ARGV[1] owner, ARGV[2] permit TTL ms, ARGV[3] '1' to queue up if not granted, ARGV[4] how
# long a queued waiter stays in line without coming back (ms), ARGV[5] the waiter's wake-up
# channel, ARGV[6] how long a permit handed to it lasts before it is extended (ms, at most the
# TTL), ARGV[7] limit, ARGV[8] weight (1..limit), ARGV[9] key (named in hand-off messages)
# -> {1, token, TTL ms, took over 0|1} granted (now, or earlier by a hand-off); {0, ms until
# the soonest holder's expiry or -2 when nobody holds, server clock µs when queued}; {0, -3}
# the caller has left; {-1, recorded limit} the limits disagree (nothing granted or queued)
_ACQUIRE = (
    FAST_ACQUIRE
    + _PRELUDE
    + """
local record = load(ARGV[1])
local gone = purge()
if record and #gone > 0 then record = gone_with(gone, ARGV[1], record) end
local head = live_head()
if S.limit ~= 0 and S.used == 0 and not head then S.limit = 0 end  -- a stale record
if S.limit ~= 0 and S.limit ~= tonumber(ARGV[7]) then
  finish()
  return {-1, S.limit}
end
if record then
  -- granted already: a retried call, or a waiter re-checking a hand-off whose claim window
  -- it may have overslept; either way it holds the permit now, for the whole TTL
  local expires = now_ms + tonumber(ARGV[2])
  redis.call('ZADD', KEYS[2], 'XX', fmt(expires), ARGV[1])
  keep(expires, false)
  -- always a write (the ZADD may change nothing within one ms): a WAIT after this call
  -- counts only this connection's writes, and must cover the hand-off it confirms
  S.dirty = true
  finish()
  local token, took = string.match(record, '^(%d+) %d+ (%d)')
  return {1, token, tonumber(ARGV[2]), tonumber(took)}
end
if redis.call('EXISTS', KEYS[5]) == 1 then  -- arrived after its own LEAVE
  finish()
  return {0, -3}
end
if S.limit == 0 then
  S.limit = tonumber(ARGV[7])
  S.dirty = true
end
local weight = tonumber(ARGV[8])
local served, blocked = false, false
if head then served, blocked = serve(ARGV[9], ARGV[1]) end
if served or (not blocked and fits(weight)) then
  local token, took = grant(ARGV[1], weight, now_ms + tonumber(ARGV[2]))
  finish()
  return {1, token, tonumber(ARGV[2]), tonumber(took)}
end
local soonest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]
local wait = soonest and math.max(tonumber(soonest) - now_ms, 0) or -2
if ARGV[3] == '1' then
  if redis.call('ZADD', KEYS[3], 'NX', clock, ARGV[1]) == 1 then
    S.line = S.line + 1
    S.dirty = true
  end
  local entry = (now_ms + tonumber(ARGV[4])) .. ' ' .. ARGV[6] .. ' ' .. ARGV[8] .. ' ' .. ARGV[5]
  redis.call('HSET', KEYS[4], ARGV[1], entry)
  local stay = tonumber(ARGV[4]) * 2
  redis.call('PEXPIRE', KEYS[3], stay)
  redis.call('PEXPIRE', KEYS[4], stay)
  S.at_least = stay
  finish()
  return {0, wait, fmt(clock)}
end
finish()
return {0, wait}
"""
)

# ARGV[1] owner, ARGV[2] key, ARGV[3] ms to keep the departure mark -> 1 released (and the
# line served), 2 released already by this owner (a retry after the reply was lost), 0 not
# held (its permit expired or was never granted). Only a release leaves the mark: that is
# what tells a retry from a lost permit.
_RELEASE = (
    FAST_RELEASE
    + _PRELUDE
    + """
local record = load(ARGV[1])
tick()
if not record or tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0') < now_ms then
  purge()  -- (it drops this expired permit, and counts it lapsed)
  tidy(nil)
  finish()
  if redis.call('EXISTS', KEYS[5]) == 1 then return 2 end
  return 0
end
drop(ARGV[1], record)
redis.call('SET', KEYS[5], '1', 'PX', ARGV[3])
local line_empty = true
if live_head() then
  purge()  -- expired holders make room for the line too
  local _, blocked = serve(ARGV[2], nil)
  line_empty = not blocked and not live_head()
end
tidy(line_empty)
finish()
return 1
"""
)

# ARGV[1] owner, ARGV[2] key, ARGV[3] ms to keep the departure mark, or 0 -> 1.
# Leave the line (timeout, cancel): the waiters behind may fit now (a writer that left no
# longer blocks the readers behind it); a permit granted in a race with the departure is given
# back, passing on whether it took one over. When an acquire of this owner may still be on its
# way, the mark makes it a no-op when it lands.
_LEAVE = (
    _PRELUDE
    + """
local record = load(ARGV[1])
local gone = purge()
if record and #gone > 0 then record = gone_with(gone, ARGV[1], record) end
unqueue(ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[5], '1', 'PX', ARGV[3]) end
if record then
  drop(ARGV[1], record)
  if string.match(record, ' 1$') then S.lapsed = S.lapsed + 1 end
end
if S.limit ~= 0 then serve(ARGV[2], nil) end
tidy(nil)
finish()
return 1
"""
)

# KEYS[1] record, KEYS[2] holders; ARGV[1] owner, ARGV[2] TTL ms -> 1 extended, 0 not held
# (expired: the next script that serves the line drops it)
_EXTEND = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'solo', 'solo_expires', 'until')
local solo = v[1] == ARGV[1]  -- (the fast path's lone holder: its expiry is in the record)
local expiry = v[2]
if not solo then expiry = redis.call('ZSCORE', KEYS[2], ARGV[1]) end
if not expiry or tonumber(expiry) < now_ms then return 0 end  -- (live through its ms)
local expires = now_ms + tonumber(ARGV[2])
if solo then
  redis.call('HSET', KEYS[1], 'solo_expires', string.format('%.0f', expires))
else
  redis.call('ZADD', KEYS[2], 'XX', string.format('%.0f', expires), ARGV[1])
end
local armed = tonumber(v[3] or '0')
if expires > armed then  -- (as keep() in the other scripts)
  armed = expires + 3600000
  redis.call('HSET', KEYS[1], 'until', string.format('%.0f', armed))
  local ms = string.format('%.0f', armed - now_ms + TAKEOVER_MS)
  redis.call('PEXPIRE', KEYS[1], ms)
  redis.call('PEXPIRE', KEYS[2], ms)
end
return 1
""".replace("TAKEOVER_MS", str(TAKEOVER_MARK_MS))

# KEYS[1] record, KEYS[2] holders, KEYS[3] line, KEYS[4] entries; no ARGV; writes nothing
# -> {live holders, newest live holder's token or -1, its owner or '', waiters in line,
# recorded limit or -1, ms until the last live permit lapses or -1}
_STATS = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[2], string.format('%.0f', now_ms), '+inf')
local solo = redis.call('HMGET', KEYS[1], 'solo', 'solo_expires', 'solo_rec')  -- (FAST_ACQUIRE)
local newest, owner, holders = -1, '', #live
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]  -- the latest expiry
last = last and tonumber(last) or -1
if solo[1] and solo[1] ~= '' and tonumber(solo[2]) >= now_ms then
  newest, owner, holders = tonumber(string.match(solo[3], '^%d+')), solo[1], holders + 1
  last = math.max(last, tonumber(solo[2]))
end
for _, who in ipairs(live) do
  local record = redis.call('HGET', KEYS[1], 'o:' .. who)
  local token = record and tonumber(string.match(record, '^%d+'))
  if token and token > newest then newest, owner = token, who end
end
local waiting = 0
for _, entry in ipairs(redis.call('HVALS', KEYS[4])) do
  if tonumber(string.match(entry, '^%d+')) > now_ms then waiting = waiting + 1 end
end
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or '0')
if (holders == 0 and waiting == 0) or limit == 0 then limit = -1 end
local ttl = -1  -- (live through its expiry ms: see purge)
if holders > 0 then ttl = last + 1 - now_ms end
return {holders, string.format('%.0f', newest), owner, waiting, limit, ttl}
"""


def _fill(text: str) -> str:
    return text.replace("TAKEOVER_MS", str(TAKEOVER_MARK_MS)).replace(
        "FENCE_SLACK", str(FENCE_SLACK_MS)
    )


PERMIT_ACQUIRE = _script("permit_acquire", _fill(_ACQUIRE))
PERMIT_RELEASE = _script("permit_release", _fill(_RELEASE))
PERMIT_LEAVE = _script("permit_leave", _LEAVE)
PERMIT_EXTEND = _script("permit_extend", _EXTEND)
PERMIT_STATS = _script("permit_stats", _STATS)
