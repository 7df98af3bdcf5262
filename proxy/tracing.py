"""W3C trace context, read and written by stax itself (cheap); the OpenTelemetry SDK is used
only when an exporter is configured (see proxy/otel.py)."""

from __future__ import annotations

from random import getrandbits

_HEX = frozenset(b"0123456789abcdef")


# Trace and span ids need to be unique, not secret (W3C trace context 3.2.2.3): the Mersenne
# Twister is several times cheaper per request than a getrandom syscall.
def new_trace_id() -> bytes:
    return b"%032x" % (getrandbits(128) or 1)


def new_span_id() -> bytes:
    return b"%016x" % (getrandbits(64) or 1)


def parse_traceparent(value: bytes | None) -> tuple[bytes, bytes, bytes] | None:
    """(trace_id, parent_span_id, flags) from a valid version-00 traceparent, else None."""
    if value is None:
        return None
    v = value.strip().lower()
    if len(v) < 55 or v[2:3] != b"-" or v[35:36] != b"-" or v[52:53] != b"-":
        return None
    version, trace_id, parent, flags = v[:2], v[3:35], v[36:52], v[53:55]
    if version == b"ff" or (version == b"00" and len(v) != 55):
        return None
    if not (set(v[:2]) | set(trace_id) | set(parent) | set(flags)) <= _HEX:
        return None
    if trace_id == b"0" * 32 or parent == b"0" * 16:
        return None
    return trace_id, parent, flags


def traceparent(trace_id: bytes, span_id: bytes, flags: bytes) -> bytes:
    return b"00-" + trace_id + b"-" + span_id + b"-" + flags
