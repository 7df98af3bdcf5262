"""Response deadlines without a timer per request.

Arming and cancelling an event-loop timer for every request cost ~1.6 µs (a TimerHandle and a
libuv timer each time). Instead an exchange waiting for its response head sits in one dict
with its deadline, and one tick scans that dict: a timeout fires late by at most the tick,
max(10 ms, 5% of the shortest timeout waiting), which keeps the scan rare for long timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

# The one clock of the request path. Final: compiled code calls it from a C static, without
# looking up `time` and then `monotonic` on every call (~400 instructions each).
monotonic: Final = time.monotonic
TICK_MIN_S: Final = 0.01
TICK_SHARE: Final = 0.05


class Deadlines:
    __slots__ = ("loop", "waiting", "handle", "tick_s", "shortest")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.waiting: dict = {}  # exchange -> monotonic deadline; exchanges pop themselves
        self.handle: asyncio.TimerHandle | None = None
        self.tick_s = 0.0
        self.shortest = 0.0  # the shortest timeout seen since the dict was last empty

    def __repr__(self) -> str:
        return f"<Deadlines waiting={len(self.waiting)} tick={self.tick_s:g}s>"

    def add(self, ex, timeout_s: float) -> None:
        self.waiting[ex] = monotonic() + timeout_s
        if self.handle is None or timeout_s < self.shortest:
            # first waiter, or a shorter timeout than any waiting: (re)arm the tick for it
            if self.handle is not None:
                self.handle.cancel()
            self.shortest = timeout_s
            self.tick_s = max(TICK_MIN_S, timeout_s * TICK_SHARE)
            self.handle = self.loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        self.handle = None
        now = monotonic()
        waiting = self.waiting
        expired = [ex for ex, deadline in waiting.items() if deadline <= now]
        try:
            for ex in expired:
                if waiting.pop(ex, None) is not None:
                    ex.timed_out()
        finally:
            if waiting and self.handle is None:
                self.handle = self.loop.call_later(self.tick_s, self._tick)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.waiting.clear()
