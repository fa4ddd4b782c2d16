"""The permit scripts' state invariants, checked after every call of a randomized driver on a
real server, a Redis Cluster and fakeredis: ``used`` is always the weight of the holders the
record keeps (a lone holder in its fixed fields, every other one as an ``o:`` field with an
expiry in the holders zset, never both kinds at once), within the limit; the record and the
zset outlive every holder's expiry; the line counter never undercounts the line; a holder
never vanishes before the expiry its grant, hand-off or extend promised, but by its own
release or leave; a new holder is the caller or a waiter that was in line, and a hand-off's
message promises no more than the server keeps.

The driver mixes what the clients do (acquire with and without waiting, release, leave,
extend, stats) with what the network and the host do to them: a call rerun as after a lost
reply, a pause past short TTLs and stays in line, a caller that asks with another limit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from keylock.backends.redis import _permit_scripts as scripts
from keylock.backends.redis._keys import Layout
from keylock.backends.redis._listener import parse_hand_off

from .._redis_server import Cluster, Server

KEY = "ns\0permit:{inv}"
LAYOUT = Layout("klinv")
STEPS = 250


class Driver:
    """One permit key driven through random calls; :meth:`check` after each."""

    def __init__(self, client: Any, listen: Any, seed: int) -> None:
        self.client = client
        self.keys = LAYOUT.permit(KEY, b"")[:4]
        self.channel = LAYOUT.wake_channel("inv")
        self.pubsub = listen.pubsub()
        self.pubsub.subscribe(self.channel)
        deadline = time.monotonic() + 5
        while (m := self.pubsub.get_message(timeout=0.05)) is None or m["type"] != "subscribe":
            assert time.monotonic() < deadline
        self.rng = random.Random(seed)
        self.limit, self.weights = self.rng.choice([(3, [1]), (3, [1, 3]), (1, [1]), (4, [1, 2])])
        self.minted = 0
        self.weight_of: dict[bytes, int] = {}  # (an owner is one acquire: one weight)
        self.waiters: set[bytes] = set()
        self.promised: dict[bytes, int] = {}  # owner -> server us it holds its permit to
        self.log: list[str] = []
        self.last: tuple[Any, bytes, tuple[object, ...], str] | None = None
        self.prev = self.snapshot()

    def owner(self) -> bytes:
        self.minted += 1
        return self.minted.to_bytes(16, "big")

    def run(self, script: Any, owner: bytes, args: tuple[object, ...]) -> Any:
        keys = LAYOUT.permit(KEY, owner)
        if script is scripts.PERMIT_EXTEND:
            keys = keys[:2]
        return self.client.eval(script.text, len(keys), *keys, *args)

    def snapshot(self) -> dict[str, Any]:
        c = self.client
        record, holders, queue, _ = self.keys
        rec = {k.decode("latin-1"): v for k, v in c.hgetall(record).items()}
        seconds, micros = c.time()
        return {
            "rec": rec,
            "zset": {m: int(float(s)) for m, s in c.zrange(holders, 0, -1, withscores=True)},
            "line": c.zrange(queue, 0, -1),
            "pttl": (c.pttl(record), c.pttl(holders)),
            "us": int(seconds) * 1_000_000 + int(micros),
        }

    @staticmethod
    def holders(s: dict[str, Any]) -> dict[bytes, tuple[int, int]]:
        """owner -> (weight, expiry ms) of every holder the server keeps."""
        rec, found = s["rec"], {}
        for field, value in rec.items():
            if field.startswith("o:"):
                owner = field[2:].encode("latin-1")
                found[owner] = (int(value.split()[1]), s["zset"].get(owner, -1))
        if rec.get("solo"):
            found[rec["solo"]] = (int(rec["solo_rec"].split()[1]), int(rec["solo_expires"]))
        return found

    def check(self, what: str, caller: bytes | None, leaves: bool) -> None:
        s, before = self.snapshot(), self.holders(self.prev)
        rec, held = s["rec"], self.holders(s)
        now_ms = s["us"] // 1000
        used, limit = int(rec.get("used", b"0")), int(rec.get("limit", b"0"))
        o_owners = {f[2:].encode("latin-1") for f in rec if f.startswith("o:")}
        wrong = []
        if used != sum(w for w, _ in held.values()):
            wrong.append(f"used {used} is not the holders' weight")
        if o_owners != set(s["zset"]):
            wrong.append("an o: record without an expiry in the zset, or the reverse")
        if rec.get("solo") and o_owners:
            wrong.append("a lone holder beside others")
        if held and not 0 < used <= limit:
            wrong.append(f"used {used} outside the limit {limit}")
        if held and s["pttl"][0] < max(e for _, e in held.values()) - now_ms:
            wrong.append(f"the record's TTL {s['pttl'][0]} ms ends before a holder's expiry")
        if s["zset"] and s["pttl"][1] < max(s["zset"].values()) - now_ms:
            wrong.append(f"the zset's TTL {s['pttl'][1]} ms ends before a holder's expiry")
        if int(rec.get("line", b"0")) < len(s["line"]):
            wrong.append("the line counter undercounts the line")
        for owner in before.keys() - held.keys():
            if owner == caller and leaves:
                continue
            if self.promised.get(owner, 0) > s["us"] or before[owner][1] >= now_ms:
                wrong.append(f"live holder {owner[-2:].hex()} dropped")
        new = held.keys() - before.keys() - {caller}
        if new - set(self.prev["line"]):
            wrong.append("a new holder that was not in line")
        while (m := self.pubsub.get_message(timeout=0.001 if new else 0)) is not None:
            hand_off = parse_hand_off(m["data"]) if m["type"] == "message" else None
            if hand_off is None:
                continue
            if hand_off.head not in held:
                wrong.append(f"a hand-off to {hand_off.head[-2:].hex()}, who holds nothing")
                continue
            promise = int(hand_off.granted_us) + int(hand_off.claim * 1_000_000)
            if promise > (held[hand_off.head][1] + 1) * 1000:
                wrong.append("a hand-off promising more than the server keeps")
            self.promised[hand_off.head] = promise
        shown = {o[-2:].hex(): (w, e - now_ms) for o, (w, e) in held.items()}
        self.log.append(f"{what} -> used {used}, holders {shown}, line {len(s['line'])}")
        assert not wrong, "; ".join(wrong) + "\n" + "\n".join(self.log[-20:])
        self.prev = s

    def call(self, script: Any, owner: bytes, args: tuple[object, ...], what: str) -> Any:
        reply = self.run(script, owner, args)
        self.last = (script, owner, args, what)
        return reply

    def granted(self, owner: bytes, ttl_ms: int) -> None:
        """*owner* was told it holds its permit *ttl_ms* from before its call."""
        self.waiters.discard(owner)
        self.promised[owner] = self.prev["us"] + ttl_ms * 1000

    def step(self) -> None:
        rng = self.rng
        held = list(self.holders(self.prev))
        roll = rng.random()
        if roll < 0.05 and self.last is not None:  # rerun, as after a lost reply
            script, owner, args, what = self.last
            reply = self.run(script, owner, args)
            self.check(f"again {what} = {reply}", owner, what in ("release", "leave"))
            return
        if roll < 0.1:
            time.sleep(rng.choice([0.003, 0.012, 0.025]))
            self.check("pause", None, False)
            return
        kind = rng.choices(["acquire", "release", "leave", "extend", "stats"], [6, 3, 1, 1, 1])[0]
        known = held + sorted(self.waiters)
        if kind == "acquire":
            if self.waiters and rng.random() < 0.5:
                owner = rng.choice(sorted(self.waiters))
            elif held and rng.random() < 0.1:
                owner = rng.choice(held)
            else:
                owner = self.owner()
            weight = self.weight_of.setdefault(owner, rng.choice(self.weights))
            ttl, wait = rng.choice([8, 20, 60, 300]), rng.random() < 0.6
            limit = self.limit if rng.random() > 0.02 else self.limit + 1
            claim = min(ttl, rng.choice([8, 40, 300]))
            stay = rng.choice([20, 100, 1000])
            args = (owner, ttl, int(wait), stay, self.channel, claim, limit, weight, KEY)
            reply = self.call(scripts.PERMIT_ACQUIRE, owner, args, "acquire")
            if int(reply[0]) == 1:
                self.granted(owner, ttl)
            elif wait and int(reply[0]) == 0 and int(reply[1]) != -3:
                self.waiters.add(owner)
            self.check(f"acquire {owner[-2:].hex()} w{weight} ttl {ttl} = {reply}", owner, False)
        elif kind in ("release", "leave"):
            owner = rng.choice(known) if known and rng.random() < 0.9 else self.owner()
            if kind == "release":
                reply = self.call(scripts.PERMIT_RELEASE, owner, (owner, KEY, 10_000), kind)
            else:
                self.waiters.discard(owner)
                args = (owner, KEY, rng.choice([0, 5000]))
                reply = self.call(scripts.PERMIT_LEAVE, owner, args, kind)
            self.check(f"{kind} {owner[-2:].hex()} = {reply}", owner, True)
        elif kind == "extend":
            owner = rng.choice(known) if known else self.owner()
            ttl = rng.choice([8, 60, 300])
            reply = self.run(scripts.PERMIT_EXTEND, owner, (owner, ttl))
            if int(reply) == 1:
                self.promised[owner] = self.prev["us"] + ttl * 1000
            self.check(f"extend {owner[-2:].hex()} {ttl} = {reply}", owner, False)
        else:
            reply = self.client.eval(scripts.PERMIT_STATS.text, 4, *self.keys)
            now_ms = self.prev["us"] // 1000
            live = sum(1 for _, e in self.holders(self.prev).values() if e >= now_ms)
            assert int(reply[0]) <= live  # (some may lapse between the look and the call)
            self.check(f"stats = {reply}", None, False)


@pytest.fixture(params=["redis", "redis-cluster", "redis-fake"])
def clients(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(client, a client to subscribe with: on a Cluster, the node that runs the scripts)."""
    if request.param == "redis":
        server: Server = request.getfixturevalue("redis_server")
        server.flush()
        client = redis.Redis.from_url(server.url)
        yield client, client
    elif request.param == "redis-cluster":
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        client = redis.cluster.RedisCluster(host=cluster.host, port=cluster.port)
        node = client.get_node_from_key(LAYOUT.permit(KEY, b"")[0])
        listen = redis.Redis(host=node.host, port=node.port)
        yield client, listen
        listen.close()
    else:
        import fakeredis

        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield client, client
    client.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_permit_scripts_keep_their_invariants_after_every_call(
    clients: tuple[Any, Any], seed: int
) -> None:
    client, listen = clients
    driver = Driver(client, listen, seed)
    try:
        for _ in range(STEPS):
            driver.step()
    finally:
        driver.pubsub.close()
