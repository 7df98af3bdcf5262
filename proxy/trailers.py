"""Trailer fields, after a chunked body, reach the same llhttp callback as header fields
(`on_header`). stax does not forward trailers. Once a head is parsed, this sink takes the
place of the list its fields went to. The trailers are then counted against the head limit
and never kept: otherwise a peer could grow that list without bound, since no head limit
applies past the head."""

from __future__ import annotations


class TrailerSink:
    __slots__ = ("size", "limit", "error")

    def __init__(self, limit: int, error: type) -> None:
        self.size = 0  # reset by the owner for each message
        self.limit = limit
        self.error = error  # the StaxError class raised past the limit

    def append(self, field: tuple) -> None:
        self.size += sum(len(part) for part in field) + 4
        if self.size > self.limit:
            raise self.error(f"trailer fields over {self.limit} bytes")

    def __iadd__(self, parts: tuple) -> TrailerSink:
        self.append(parts)
        return self
