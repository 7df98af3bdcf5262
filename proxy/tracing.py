"""W3C trace context, read and written by stax itself (cheap); the OpenTelemetry SDK is used
only when an exporter is configured (see proxy/otel.py)."""

from __future__ import annotations

import re
from random import getrandbits


# Trace and span ids need to be unique, not secret (W3C trace context 3.2.2.3): the Mersenne
# Twister is several times cheaper per request than a getrandom syscall.
def new_trace_id() -> bytes:
    return b"%032x" % (getrandbits(128) or 1)


def new_span_id() -> bytes:
    return b"%016x" % (getrandbits(64) or 1)


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_VERSION_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


def parse_traceparent(value: bytes | None) -> tuple[bytes, bytes, bytes] | None:
    """(trace_id, parent_span_id, flags) from a valid traceparent, else None."""
    if value is None:
        return None
    m = _VERSION_00(value)  # as sent by nearly everyone: one C match
    if m is not None:
        trace_id, parent, flags = m.groups()
        if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
            return None
        return trace_id, parent, flags
    return _parse_slow(value)


def _parse_slow(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        m = _TRACEPARENT.fullmatch(value.strip().lower())
        if m is None:
            return None
    version, trace_id, parent, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest) or trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, parent, flags


def traceparent(trace_id: bytes, span_id: bytes, flags: bytes) -> bytes:
    return b"00-" + trace_id + b"-" + span_id + b"-" + flags
