"""The Lua scripts of the Redis protocol, as constants with their KEYS/ARGV headers.

Each script runs atomically on the server; every one of them is safe to run twice (a retry
after a lost reply): they compare the owner before they act.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

__all__ = [
    "ACQUIRE",
    "EXTEND",
    "FENCE_SLACK_MS",
    "FORCE_RELEASE",
    "LEAVE",
    "RELEASE",
    "RELEASE_MARK_MS",
    "TAKEOVER_MARK_MS",
    "Script",
]


class Script(NamedTuple):
    """A script and its SHA-1 (EVALSHA first, the text only when the server lacks it)."""

    name: str
    sha: str
    text: str
    sha_bytes: bytes  # (the direct wire's EVALSHA argument: encoded once, not per call)


def _script(name: str, text: str) -> Script:
    sha = hashlib.sha1(text.encode()).hexdigest()
    return Script(name, sha, text, sha.encode())


FENCE_SLACK_MS = 120_000  # the fence key outlives the lock by this much (see ACQUIRE)
# How long a release's mark outlives it (see RELEASE): the wire retries at once after a
# connection error, so the retry lands well within this.
RELEASE_MARK_MS = 10_000
# How long the unreleased mark outlives its lease (see hand_off): a holder that takes the key
# within a day of a lease's expiry learns it took over; later than that, it is not told.
TAKEOVER_MARK_MS = 86_400_000

# Every script gets the same five keys of one lock (one hash tag, so one Cluster slot):
# KEYS[1] lock (value: owner id), KEYS[2] fence (last token), KEYS[3] queue (zset owner ->
# arrival µs), KEYS[4] queue members (hash owner -> "<deadline ms> <lease TTL ms> <claim ms>
# <channel>"), KEYS[5] unreleased mark.
# took_over: every grant sets the unreleased mark (value '1' if that lease took over, else
# '0', for a retried ACQUIRE to report again) for the lease's TTL plus TAKEOVER_MARK_MS;
# only its holder's RELEASE (or a LEAVE giving a grant back) deletes it. A grant of a free
# key that finds the mark follows a lease that ended without a release (it expired, its
# holder died, or an operator forced it): it took the key over.
# Tokens are max(last + 1, server clock in µs): they rise even when Redis lost the fence key
# (restart without persistence, failover to a lagging replica), because the clock has moved on
# past every token it ever minted (at most one grant per µs of a single-threaded server).
# Waiters queue FIFO across all clients; a release hands the key straight to the live head of
# the queue (no barging, no extra round trip) and publishes "<token> <granted at, server µs>
# <claim ms> <head><key>" (head: 16 bytes) on the channel of the head's process only, so one
# process wakes per hand-off, not every process that waits; a waiter that does not come back
# in time leaves the line.
_PRELUDE = """
local clock, now_ms
local function tick()  -- the server clock, read once per script and only when needed
  if not clock then
    local now = redis.call('TIME')
    clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
    now_ms = math.floor(clock / 1000)
  end
end
local function live_head()
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  while head do
    tick()
    local entry = redis.call('HGET', KEYS[4], head)
    if entry and tonumber(string.match(entry, '^%d+')) > now_ms then return head, entry end
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
    head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  end
  return nil, nil
end
local function mint(ttl_ms)
  tick()
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = string.format('%.0f', math.max(last + 1, clock))
  redis.call('SET', KEYS[2], token, 'PX', tonumber(ttl_ms) + 120000)
  return token
end
local function mark(took, ttl_ms)  -- a new lease: unreleased until its holder releases it
  local ms = string.format('%.0f', tonumber(ttl_ms) + TAKEOVER_MS)
  redis.call('SET', KEYS[5], took, 'PX', ms)
end
local function hand_off(key, took)
  local head, entry = live_head()
  if not head then return end  -- nobody in line: waiters queue in their first trip
  -- the head gets the key for its claim window only (its renewer, or its acquire, extends
  -- it to the full TTL): a waiter that died in line holds it that long, not a whole TTL
  local ttl_ms, claim_ms, channel = string.match(entry, '^%d+ (%d+) (%d+) (.*)$')
  redis.call('SET', KEYS[1], head, 'PX', claim_ms)
  local token = mint(ttl_ms)
  mark(took, ttl_ms)
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[4], head)
  -- the key goes last: it may contain NUL (a namespace separator), and nothing parses past it
  local dated = string.format('%.0f', clock)  -- dates the waiter's lease
  -- a key taken over (forced) is announced with a claim of 0 ms: the head then asks with its
  -- ACQUIRE, whose reply says took_over (the message has no field for it)
  local shown = took == '1' and '0' or claim_ms
  redis.call('PUBLISH', channel, token .. ' ' .. dated .. ' ' .. shown .. ' ' .. head .. key)
end
"""

_PRELUDE = _PRELUDE.replace("TAKEOVER_MS", str(TAKEOVER_MARK_MS))

# KEYS[6] the acquisition's departure mark (see LEAVE); ARGV[1] owner, ARGV[2] lease TTL ms,
# ARGV[3] '1' to queue up if not granted, ARGV[4] how long a queued waiter stays in line without
# coming back (ms), ARGV[5] the waiter's wake-up channel, ARGV[6] how long a lease handed to it
# at a release lasts before it is extended (ms, at most the TTL)
# -> {1, token, TTL ms, took over 0|1} granted (now, or earlier by a hand-off); {0, holder's
# PTTL ms, or -2 when the key is free but promised to the head of the queue, server clock µs
# when queued}; {0, -3} the caller has left
_ACQUIRE = (
    """
-- the common case first, before the prelude makes its closures: nobody in line, this caller
-- never left, the last lease was released (no unreleased mark: nothing taken over), and the
-- key is free. The same steps as the general path below, fewer calls.
if redis.call('EXISTS', KEYS[3], KEYS[5], KEYS[6]) == 0
    and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local ttl = tonumber(ARGV[2])
  local took = 0
  redis.call('SET', KEYS[5], took, 'PX', string.format('%.0f', ttl + TAKEOVER_MS))
  local now = redis.call('TIME')
  local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = string.format('%.0f', math.max(last + 1, clock))
  redis.call('SET', KEYS[2], token, 'PX', string.format('%.0f', ttl + 120000))
  return {1, token, ttl, took}
end
"""
    + _PRELUDE
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- granted already: a retried call, or a waiter re-checking a hand-off whose claim window
  -- it may have overslept; either way it holds the key now, for the whole TTL
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 120000)
  local took = redis.call('GET', KEYS[5]) or '0'
  mark(took, ARGV[2])
  return {1, redis.call('GET', KEYS[2]) or '0', tonumber(ARGV[2]), tonumber(took)}
end
if redis.call('EXISTS', KEYS[6]) == 1 then return {0, -3} end  -- arrived after its own LEAVE
local head = live_head()
if (not head or head == ARGV[1])
    and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if head then
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
  end
  local took = redis.call('EXISTS', KEYS[5])  -- the last lease was never released
  mark(tostring(took), ARGV[2])
  return {1, mint(ARGV[2]), tonumber(ARGV[2]), took}
end
if ARGV[3] == '1' then
  tick()
  redis.call('ZADD', KEYS[3], 'NX', clock, ARGV[1])
  local entry = (now_ms + tonumber(ARGV[4])) .. ' ' .. ARGV[2] .. ' ' .. ARGV[6] .. ' ' .. ARGV[5]
  redis.call('HSET', KEYS[4], ARGV[1], entry)
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 2)
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[4]) * 2)
  return {0, redis.call('PTTL', KEYS[1]), string.format('%.0f', clock)}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
)

# KEYS[6] the owner's departure mark; ARGV[1] owner, ARGV[2] key (named in the hand-off
# message), ARGV[3] ms to keep the mark -> 1 released (and handed on), 2 released already by
# this owner (a retry after the reply was lost), 0 not ours. The mark is what tells a retry from
# a lost lease: the key may be free or handed on either way, but only a release leaves the mark.
# A lease that was not ours any more keeps its unreleased mark: the next holder took over.
_RELEASE = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  if redis.call('EXISTS', KEYS[6]) == 1 then return 2 end
  return 0
end
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('SET', KEYS[6], '1', 'PX', ARGV[3])
-- nobody in line: nothing to hand on, and no need for the prelude's closures
if redis.call('EXISTS', KEYS[3]) == 0 then return 1 end
"""
    + _PRELUDE
    + """
hand_off(ARGV[2], '0')
return 1
"""
)

# KEYS[6] the departure mark; ARGV[1] owner, ARGV[2] key, ARGV[3] ms to keep the mark, or 0.
# Leave the line (timeout, cancel); a grant that raced the departure is passed on to the next in
# line. When an ACQUIRE of this owner may still be on its way (the caller gave up mid-call, and
# the reply never came), the mark makes that late ACQUIRE a no-op instead of a phantom grant.
_LEAVE = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[6], '1', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- a grant given back unused passes on whether it took the key over
  local took = redis.call('GET', KEYS[5]) or '0'
  redis.call('DEL', KEYS[1])
  if took ~= '1' then redis.call('DEL', KEYS[5]) end
  hand_off(ARGV[2], took)
end
return 1
"""
)

# KEYS[1] lock key, KEYS[2] fence key, KEYS[3] unreleased mark; ARGV[1] owner id, ARGV[2] TTL
# ms, ARGV[3] fence TTL ms, ARGV[4] mark TTL ms -> 1 extended, 0 not ours any more
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return 1
end
return 0
"""


# KEYS[1..5] the lock's keys; ARGV[1] the owner an operator was shown, ARGV[2] key
# -> 1 deleted and handed to the next waiter (woken on its own process's channel), 0 the lock
# is free or held by another owner now (nothing changed). ``keylock release --force``: the
# operator deletes only the lease they looked at, never one taken since. Its holder did not
# release it, so its unreleased mark stays: the next holder took the key over
# (``lease.took_over``), as after an expiry.
_FORCE_RELEASE = (
    _PRELUDE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
hand_off(ARGV[2], '1')
return 1
"""
)

ACQUIRE = _script("acquire", _ACQUIRE.replace("TAKEOVER_MS", str(TAKEOVER_MARK_MS)))
RELEASE = _script("release", _RELEASE)
LEAVE = _script("leave", _LEAVE)
EXTEND = _script("extend", _EXTEND)
FORCE_RELEASE = _script("force_release", _FORCE_RELEASE)
