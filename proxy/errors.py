"""The one rescue point: every StaxError becomes the same JSON error response.

Third-party errors (httptools, OS socket errors, redis) are mapped to StaxError at the
boundary where they happen; nothing else in the proxy formats an error.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import orjson

from resolver.errors import StaxError

_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[421] = b"Misdirected Request"
STATUS_LINES: Final[dict[int, bytes]] = {}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
    return line


def error_response(exc: StaxError, *, route_header: bytes | None, close: bool, head_only: bool,
                   keep_alive: bool = False) -> bytes:
    """Serialize `{"error": CODE, "message": TEXT}` with `x-stax-error: CODE`."""
    body = orjson.dumps({"error": exc.code, "message": exc.message})
    parts = [
        status_line(exc.status),
        b"content-type: application/json\r\ncontent-length: %d\r\nx-stax-error: %s\r\n"
        % (len(body), exc.code.encode()),
    ]
    if route_header is not None:
        parts.append(b"x-stax-route: " + route_header + b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    elif keep_alive:  # asked for: say it back (an HTTP/1.0 client needs it)
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def rescue(exc: BaseException) -> StaxError:
    """Classify anything into a StaxError (unknown errors are a 502 we can explain)."""
    if isinstance(exc, StaxError):
        return exc
    from resolver.errors import UpstreamTimeout, UpstreamUnavailable

    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("upstream did not answer in time")
    if isinstance(exc, OSError):
        return UpstreamUnavailable(f"upstream connection failed: {exc.strerror or exc}")
    err = StaxError(f"internal error: {type(exc).__name__}")
    return err
