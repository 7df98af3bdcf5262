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
