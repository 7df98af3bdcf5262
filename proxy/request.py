"""The small request-head object the pipeline stages work on (no framework objects here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from resolver.snapshot import Route

    from .stages.context import Parsed

LONG_BODY: Final = 1 << 20
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Never forwarded (RFC 9110 7.6.1), plus what stax rewrites itself on every hop.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
})
REWRITTEN: Final = frozenset({
    b"content-length", b"baggage", b"x-stax-env", b"traceparent", b"x-stax-hops",
    b"x-forwarded-for", b"x-forwarded-proto", b"expect",
    b"x-stax-env-token",  # a credential for the edge: never forwarded
})
NOT_COPIED: Final = HOP_BY_HOP | REWRITTEN  # request headers never copied as received


class Request:
    """One client request: parsed head, routing decisions, and the trace context."""

    __slots__ = (
        "method", "target", "path", "version", "headers", "keep_alive", "chunked",
        "content_length", "peer", "scheme", "upgrade",
        "env", "service", "route", "hops", "trace_id", "parent_id", "span_id", "trace_flags",
        "started", "host", "expect_continue", "hop_names",
        "h_baggage", "h_env", "h_traceparent", "h_hops", "h_cookie", "h_xff", "h_xfp",
        "span", "echo_keep_alive", "parsed",
    )

    def __init__(self, method: bytes, target: bytes, version: str | None,
                 headers: list[tuple[bytes, bytes, bytes]],
                 keep_alive: bool, peer: str, scheme: bytes, started: float) -> None:
        self.method = method
        self.target = target
        self.path = target  # origin-form path+query forwarded upstream (route/sanitize may rewrite)
        self.version = version  # "1.1"; None until needed (ClientConnection.http_version)
        self.headers = headers  # [(lowercased name, original name, value)] as received
        self.keep_alive = keep_alive
        self.peer = peer
        self.scheme = scheme
        self.started = started
        self.chunked = False
        self.content_length: int | None = None
        self.upgrade: bytes | None = None  # the Upgrade header of a `Connection: upgrade` request
        self.env: str | None = None
        self.service: str | None = None
        self.route: Route | None = None
        self.hops = 0
        self.trace_id = self.span_id = b""
        self.parent_id = b""  # the caller's span id, from a valid incoming traceparent
        self.trace_flags = b"01"
        self.host: bytes | None = None
        self.expect_continue = False
        self.hop_names: frozenset[bytes] = NOT_COPIED  # plus names listed in Connection
        # Raw values of the headers stax interprets, picked out in one pass by sanitize.
        self.h_baggage: list[bytes] | None = None
        self.h_env: bytes | None = None
        self.h_traceparent: bytes | None = None
        self.h_hops: bytes | None = None
        self.h_cookie: bytes | None = None
        self.h_xff: bytes | None = None
        self.h_xfp: bytes | None = None
        self.span: Any = None  # OpenTelemetry server span, only when tracing is configured
        # `Connection: keep-alive` asked: the response says it back, as an HTTP/1.0 client
        # needs to keep the connection (RFC 9112 C.2.2)
        self.echo_keep_alive = False
        # its baggage header, parsed (context stage): the env it names, the other members and
        # the context lines they make
        self.parsed: Parsed | None = None

    def __repr__(self) -> str:
        return (f"<Request {self.method.decode()} {self.path.decode('latin-1')} "
                f"env={self.env} service={self.service}>")

    def header(self, lname: bytes) -> bytes | None:
        for name, _, value in self.headers:
            if name == lname:
                return value
        return None

    def header_all(self, lname: bytes) -> list[bytes]:
        return [v for n, _, v in self.headers if n == lname]

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def long_body(self) -> bool:
        """Declared over 1 MiB: left unread, not worth reading only to keep the connection (a
        chunked body is read up to as much, then the connection closes)."""
        return (self.content_length or 0) > LONG_BODY
