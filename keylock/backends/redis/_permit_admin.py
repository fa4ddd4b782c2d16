"""The operator's script for Redis permits (``keylock release --force`` of a semaphore's or
an RW lock's permit), on the permit scripts' prelude (see :mod:`._permit_scripts`)."""

from __future__ import annotations

from ._permit_scripts import _PRELUDE, _fill
from ._scripts import _script

__all__ = ["PERMIT_FORCE"]

# KEYS[1..4] as for the other permit scripts (no departure mark: see below); ARGV[1] the
# owner whose permit to break, or '' for the newest live holder (highest token); ARGV[2] key
# (named in hand-off messages) -> {1, owner broken} or {0, ''} when no such live permit.
# The permit ends as one that expired unreleased: it counts as lapsed (the next grant took
# over), its weight frees and the line is served at once, as at a release. No departure mark
# is set: the holder's own release finds no record and no mark, and reports the permit lost;
# its extend finds no expiry and fails.
_FORCE = (
    _PRELUDE
    + """
local record = load(ARGV[1])
local gone = purge()
local owner = ARGV[1]
if owner == '' then
  record = nil
  if S.used > 0 then  -- (purge left only live holders' o: fields)
    local fields = redis.call('HGETALL', KEYS[1])
    local newest = -1
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'o:' then
        local token = tonumber(string.match(fields[i + 1], '^%d+'))
        if token > newest then
          newest, owner, record = token, string.sub(fields[i], 3), fields[i + 1]
        end
      end
    end
  end
elseif record and #gone > 0 then
  record = gone_with(gone, owner, record)
end
if not record then
  if S.dirty then tidy(nil) end  -- (purge dropped someone; a key never held stays unwritten)
  finish()
  return {0, ''}
end
drop(owner, record)
S.lapsed = S.lapsed + 1
local line_empty = true
if live_head() then
  local _, blocked = serve(ARGV[2], nil)
  line_empty = not blocked and not live_head()
end
tidy(line_empty)
finish()
return {1, owner}
"""
)

PERMIT_FORCE = _script("permit_force", _fill(_FORCE))
