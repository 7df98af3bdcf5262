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
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
_LOWER_HEX = b"0123456789abcdef"


def parse_traceparent(value: bytes | None) -> tuple[bytes, bytes, bytes] | None:
    """(trace_id, parent_span_id, flags) from a valid traceparent, else None."""
    if value is None:
        return None
    if len(value) == 55 and value[:3] == b"00-" and value[35] == 45 and value[52] == 45:
        # version 00 as sent by nearly everyone: checked by slicing, cheaper than the regex
        if value.translate(None, _LOWER_HEX) != b"---":
            return _parse_slow(value)
        trace_id, parent = value[3:35], value[36:52]
        if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
            return None
        return trace_id, parent, value[53:]
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
