"""A permit whose holder stopped (paused past its TTL, no auto-renew) is taken over by another
client no sooner than the expiry its holder was told: the chaos history checker, judging the
holder by the expiry its lease showed, never finds it live beside the one that took over.

The taker spins tries (``timeout=0``) from the moment the holder stops, so its grant lands as
early as the store allows. This is the chaos row "permit holder paused past its TTL" made
sharp: there a takeover landed in the last ms of a paused holder's lease once in hundreds of
runs ("4 leases of weight 4 > limit 3"); here most trials would.
"""

from __future__ import annotations

import time

import pytest

from keylock import KeyedSemaphore, LockTimeout

from ..chaos._history import Grant, History, believed_expiry
from ..conftest import MakeBackend

TTL = 0.02
TRIALS = 10


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another"])
def test_a_paused_holder_is_taken_over_only_after_its_expiry(
    make_permit_client: MakeBackend, others: int
) -> None:
    """Every backend. Fails before f0c327a on Redis, Cluster and fakeredis, alone and beside
    another holder (the scripts dropped a holder up to 1 ms before the TTL its client
    counted): 194 of 200 trials overlapped on a server, 142 of 200 on a Cluster."""
    limit = 1 + others
    holder = KeyedSemaphore(make_permit_client(auto_renew=False), limit=limit)
    taker = KeyedSemaphore(make_permit_client(auto_renew=False), limit=limit)
    history = History(limit=limit)
    for n in range(TRIALS):
        key = f"job:{n}"
        kept = [holder.acquire_sync(key, ttl=60) for _ in range(others)]  # (room for one)
        for other in kept:
            history.granted(Grant(key, other.token, f"kept#{n}", time.monotonic(), None))
        lease = holder.acquire_sync(key, ttl=TTL)
        now = time.monotonic()
        history.granted(Grant(key, lease.token, f"paused#{n}", now, believed_expiry(lease)))
        deadline = time.monotonic() + 5
        while True:  # the paused holder never releases: its room is taken over
            try:
                took = taker.acquire_sync(key, timeout=0, ttl=60)
                break
            except LockTimeout:
                assert time.monotonic() < deadline
        history.granted(Grant(key, took.token, f"taker#{n}", time.monotonic(), None))
        assert took.took_over
        ended = time.monotonic()
        for grant in history.grants:
            if grant.key == key and grant.expires_at is None:
                grant.released_at = ended
        took.release_sync()
        for other in kept:
            other.release_sync()
    verdict = history.check()
    assert verdict.ok, verdict
