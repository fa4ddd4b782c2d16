"""The Redis key layout: the only place that knows the names keylock gives its Redis keys.

Every Redis key of one lock shares one hash tag (one Cluster slot), and the tag is an
unambiguous encoding of the full key: ``%``, ``{``, ``}`` and NUL are percent-encoded, so two
distinct keys never share a tag (a tag cannot end early at a brace, and ``"%7B"`` spelled out
stays apart from an encoded ``"{"``). Full keys may carry a namespace as ``namespace + "\\0" +
key``; the NUL is encoded inside the tag, and hand-off messages carry the key last, so nothing
splits on it.

    prefix:{tag}                 the lock (value: owner id)
    prefix:{tag}:fence           the last token minted
    prefix:{tag}:queue           waiters (zset owner -> arrival, server µs)
    prefix:{tag}:alive           waiters' entries (hash owner -> deadline, TTL, claim, channel)
    prefix:{tag}:unreleased      the last lease granted, until its holder releases it (value:
                                 1 if that lease itself took over); outlives it by a day, so
                                 the next holder learns it took over an expired lease
    prefix:{tag}:left:<owner>    a departure mark (see LEAVE and RELEASE in _scripts)
    prefix:{tag}:permits         a permit key's record (hash: limit, weight held, token
                                 counter, lapsed permits, each holder's token/weight/took)
    prefix:{tag}:permits:holders its holders (zset owner -> expiry, server ms)
    prefix:{tag}:permits:queue   its waiters (zset owner -> arrival, server µs)
    prefix:{tag}:permits:waiting its waiters' entries (hash owner -> deadline, claim, weight,
                                 channel)
    prefix:{tag}:permits:left:<owner>  a departure mark (see _permit_scripts)
    prefix:wake:<process id>     the wake-up channel of one process's backend
    prefix:{flight:tag}:result:<token>   a single-flight leader's stored outcome
    prefix:{tag} / prefix:{tag}:fence    fenced_set's value and fence (prefix keylock:fenced)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import InvalidKey

__all__ = ["Layout", "tag", "untag"]

_ENCODE = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D", "\0": "%00"})
_DECODE = {"%25": "%", "%7B": "{", "%7D": "}", "%00": "\0"}
_ESCAPE = re.compile("%(?:25|7B|7D|00)")


def tag(key: str) -> str:
    """The hash tag of *key*: a one-to-one encoding without braces; InvalidKey when *key*
    cannot be a Redis key name (a lone surrogate is not UTF-8)."""
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidKey(
            f"lock key {key!r} is not valid UTF-8 ({exc.reason} at {exc.start}), so it cannot "
            "name a Redis key: decode it properly, or lock a hash of it",
            key=key,
        ) from None
    return key.translate(_ENCODE)


def untag(encoded: str) -> str:
    """The key whose tag is *encoded* (the inverse of :func:`tag`)."""
    return _ESCAPE.sub(lambda match: _DECODE[match.group()], encoded)


@dataclass(frozen=True, slots=True)
class Layout:
    """The names of every Redis key and channel under one *prefix*."""

    prefix: str

    def __post_init__(self) -> None:
        prefix = self.prefix
        if not isinstance(prefix, str) or not prefix or set("{}\0") & set(prefix):
            raise (TypeError if not isinstance(prefix, str) else ValueError)(
                f"Redis key prefix must be a non-empty str without braces or NUL, not "
                f"{prefix!r}: braces would move every key's hash tag into the prefix"
            )

    def lock(self, key: str) -> list[str]:
        """lock, fence, queue, queue entries, unreleased mark: one hash tag, so one Cluster
        slot."""
        base = f"{self.prefix}:{{{tag(key)}}}"
        return [base, f"{base}:fence", f"{base}:queue", f"{base}:alive", f"{base}:unreleased"]

    def extend(self, key: str) -> list[str]:
        """The three keys of EXTEND: lock, fence, unreleased mark."""
        base = f"{self.prefix}:{{{tag(key)}}}"
        return [base, f"{base}:fence", f"{base}:unreleased"]

    def departure(self, key: str, owner: bytes) -> str:
        """The mark an acquisition leaves when it gives up with a call in flight."""
        return f"{self.prefix}:{{{tag(key)}}}:left:{owner.hex()}"

    def acquire(self, key: str, owner: bytes) -> list[str]:
        """The six keys of ACQUIRE, LEAVE and RELEASE: the lock's five and *owner*'s departure
        mark."""
        base = f"{self.prefix}:{{{tag(key)}}}"
        return [
            base,
            f"{base}:fence",
            f"{base}:queue",
            f"{base}:alive",
            f"{base}:unreleased",
            f"{base}:left:{owner.hex()}",
        ]

    def permit(self, key: str, owner: bytes) -> list[str]:
        """The five keys of a permit script (see _permit_scripts): record, holders, queue,
        waiters' entries, *owner*'s departure mark. One hash tag, so one Cluster slot; none
        of them is a lock's key, so a lock and a semaphore of one name never meet."""
        base = f"{self.prefix}:{{{tag(key)}}}:permits"
        left = f"{base}:left:{owner.hex()}"
        return [base, f"{base}:holders", f"{base}:queue", f"{base}:waiting", left]

    def permit_extend(self, key: str) -> list[str]:
        """The two keys of PERMIT_EXTEND and PERMIT_STATS' first two: record, holders."""
        base = f"{self.prefix}:{{{tag(key)}}}:permits"
        return [base, f"{base}:holders"]

    def permit_scan_pattern(self) -> str:
        """A SCAN pattern matching every permit key's record (filter with
        :meth:`parse_permit`)."""
        return f"{self.scan_pattern()}:permits"

    def parse_permit(self, name: str) -> str | None:
        """The key whose permit record is *name*, or None when *name* is not one."""
        suffix = ":permits"
        return self.parse(name[: -len(suffix)]) if name.endswith(suffix) else None

    def wake_channel(self, process_id: str) -> str:
        """The pub/sub channel hand-offs to one backend's waiters are published on."""
        return f"{self.prefix}:wake:{process_id}"

    def flight_result(self, key: str, token: int) -> str:
        """Where the single-flight leader holding lease *token* stores its outcome for *key*."""
        return f"{self.prefix}:{{{tag('flight:' + key)}}}:result:{token}"

    def completions(self, key: str, scope: str) -> str:
        """stale_guard's count of calls for *key* completed in *scope* (a digest)."""
        return f"{self.prefix}:{{{tag(key)}}}:done:{scope}"

    def fenced(self, resource: str) -> list[str]:
        """fenced_set's value key and fence key for *resource* (one Cluster slot)."""
        return self.lock(resource)[:2]

    def scan_pattern(self) -> str:
        """A SCAN pattern matching every lock key (and some companions: filter with
        :meth:`parse`)."""
        escaped = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)
        return f"{escaped}:{{*}}"

    def parse(self, name: str) -> str | None:
        """The key whose lock key is *name*, or None when *name* is not a lock key (a
        companion, a result, another prefix)."""
        start = f"{self.prefix}:{{"
        if not (name.startswith(start) and name.endswith("}")):
            return None
        inner = name[len(start) : -1]
        if "{" in inner or "}" in inner:
            return None
        return untag(inner)
