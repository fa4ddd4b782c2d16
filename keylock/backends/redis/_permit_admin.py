"""The operator's script for Redis permits (``keylock release --force`` of a semaphore's or
an RW lock's permit), on the permit scripts' prelude (see :mod:`._permit_scripts`)."""

from __future__ import annotations

from ._permit_scripts import _PRELUDE, _fill
from ._scripts import _script

__all__ = ["PERMIT_FORCE"]

# KEYS[1..4] as for the other permit scripts (no departure mark: see below); ARGV[1] the
# owner whose permit to break, ARGV[2] key (named in hand-off messages) -> 1 broken, 0 when
# *owner* holds no live permit there (nothing changed but expired holders dropped, as any
# permit script drops them). The permit ends as one that expired unreleased: it counts as
# lapsed (the next grant took over), its weight frees and the line is served at once, as at
# a release. No departure mark is set: the holder's own release finds no record and no mark,
# and reports the permit lost; its extend finds no expiry and fails. Safe to run twice (a
# retry after a lost reply finds nothing to break), which is why the owner is named: the
# caller reads the newest holder first (PERMIT_STATS), so a retry cannot break a second one.
_FORCE = (
    _PRELUDE
    + """
local record = load(ARGV[1])
local gone = purge()
if record and #gone > 0 then record = gone_with(gone, ARGV[1], record) end
if not record then
  if S.dirty then tidy(nil) end  -- (purge dropped someone; a key never held stays unwritten)
  finish()
  return 0
end
drop(ARGV[1], record)
S.lapsed = S.lapsed + 1
local line_empty = true
if live_head() then
  local _, blocked = serve(ARGV[2], nil)
  line_empty = not blocked and not live_head()
end
tidy(line_empty)
finish()
return 1
"""
)

PERMIT_FORCE = _script("permit_force", _fill(_FORCE))
