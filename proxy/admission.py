"""Admit: an in-flight limit; past it, 503 overloaded at once so admitted requests keep
their latency. Paired with a release when the request ends, so it is called by the
connection around the stage list rather than being one of the stages."""

from __future__ import annotations

from resolver.errors import Overloaded


class Admission:
    __slots__ = ("limit", "inflight", "rejected")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return f"<Admission {self.inflight}/{self.limit}>"

    def admit(self) -> None:
        if self.inflight >= self.limit:
            self.rejected += 1
            raise Overloaded(f"{self.inflight} requests in flight (limit {self.limit})")
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
