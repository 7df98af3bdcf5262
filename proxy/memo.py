"""Caches keyed by bytes that clients choose (header values): bounded, so a client cannot
grow them without limit. Emptied whole when full: cheaper than tracking recency, and the
values that repeat (nearly all of them) are back after one miss each."""

from __future__ import annotations

from typing import Final

LIMIT: Final = 16384


def remember(cache: dict, key, value, limit: int = LIMIT):
    """cache[key] = value, emptying the cache first when it holds `limit` entries."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


_LOWER: Final[dict[bytes, bytes]] = {}


def lower_name(name: bytes) -> bytes:
    """A header name lowercased, as one shared object per spelling. Names repeat on every
    request, and a shared object keeps its hash: the set and dict look-ups that follow (hop
    by hop? one of stax's?) skip hashing it again, and no method call lowers it."""
    lname = _LOWER.get(name)
    if lname is None:
        lname = remember(_LOWER, name, name.lower())
    return lname
