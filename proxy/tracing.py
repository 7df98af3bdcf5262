"""W3C trace context, read and written by stax itself (cheap); the OpenTelemetry SDK is used
only when an exporter is configured (see proxy/otel.py)."""

from __future__ import annotations

import os
import re
from random import getrandbits
from typing import Final


class _RandomHex:
    """Trace and span ids need to be unique, not secret (W3C trace context 3.2.2.3): the
    Mersenne Twister, 4,096 hex digits at a time, so an id is a slice of a buffer rather than
    a formatting of its own (several times cheaper per request; emptied in a forked child,
    which must not repeat its parent's ids)."""

    def __init__(self) -> None:
        self.buf = b""
        self.at = 0

    def take(self, digits: int) -> bytes:
        at = self.at
        if at + digits > len(self.buf):
            self.buf = getrandbits(16384).to_bytes(2048, "big").hex().encode()
            at = 0
        self.at = at + digits
        return self.buf[at:at + digits]

    def reset(self) -> None:
        self.buf = b""
        self.at = 0


_IDS: Final = _RandomHex()
os.register_at_fork(after_in_child=_IDS.reset)
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16
# Every lowercase hex digit maps to "0", "-" to itself, anything else to "x": a version-00
# traceparent's bytes map to exactly _SHAPE_00 (one C call and one compare, no regex).
_SHAPE: Final = bytes(48 if chr(b) in "0123456789abcdef" else 45 if b == 45 else 120
                      for b in range(256))
_SHAPE_00: Final = b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00"


def new_trace_id() -> bytes:
    trace_id = _IDS.take(32)
    return trace_id if trace_id != _ZERO_TRACE else new_trace_id()


def new_span_id() -> bytes:
    span_id = _IDS.take(16)
    return span_id if span_id != _ZERO_SPAN else new_span_id()


_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value: bytes | None) -> tuple[bytes, bytes, bytes] | None:
    """(trace_id, parent_span_id, flags) from a valid traceparent, else None."""
    if value is None:
        return None
    # version 00 as sent by nearly everyone: 00-<32 hex>-<16 hex>-<2 hex>, lowercase
    if value[:2] == b"00" and value.translate(_SHAPE) == _SHAPE_00:
        trace_id = value[3:35]
        parent = value[36:52]
        if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
            return None
        return trace_id, parent, value[53:55]
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
