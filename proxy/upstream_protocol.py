"""One upstream HTTP/1.1 connection: httptools parses the response, events go to the
Exchange currently attached. Nothing here decides policy."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from resolver.errors import UpstreamBadResponse

from .deadlines import monotonic
from .memo import lower_name
from .request import HOP_BY_HOP
from .trailers import TrailerSink

if TYPE_CHECKING:
    from .stages.forward import Exchange
    from .upstream_pool import UpstreamPool

# Response headers stax interprets; every other header is forwarded as one ready line.
INTERPRETED: Final = HOP_BY_HOP | {b"content-length", b"x-stax-route"}
# Whether a name of each length could be one of them: most response headers (Date, Server,
# ETag, Cache-Control, ...) are not, and are forwarded without lowercasing or a look-up.
_MAYBE_INTERPRETED: Final[tuple[bool, ...]] = tuple(
    any(len(n) == size for n in INTERPRETED) for size in range(max(map(len, INTERPRETED)) + 1))


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "key", "transport", "parser", "exchange", "closed", "idle", "idle_since",
        "lines", "special", "status", "interim", "no_body", "reset_parser", "uses", "head_done",
        "eof_body", "tunnel", "length", "head_bytes", "trailers", "half_closed",
    )

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        # [status line, name, b": ", value, b"\r\n", ...] of the head being parsed
        self.lines: list[bytes] = [b""]
        # (lowercased name, value) of the INTERPRETED headers, less a plain `Connection:
        # keep-alive` (it says nothing here) and Content-Length (llhttp refuses a second one):
        self.special: list[tuple[bytes, bytes]] = []
        self.length: bytes | None = None
        self.status = 0
        self.interim = False
        self.no_body = False  # the request was HEAD: the response has no body whatever it says
        self.reset_parser = False
        self.uses = 0
        self.head_done = False
        self.head_bytes = 0  # read while the response head was incomplete (bounded)
        self.eof_body = False
        self.tunnel: Exchange | None = None  # after a 101: the Exchange relaying raw bytes both ways
        self.trailers = TrailerSink(pool.max_head_bytes, UpstreamBadResponse)
        self.half_closed = False  # in a tunnel: the upstream sent FIN, the client may go on

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("idle" if self.idle else "active")
        return f"<UpstreamConnection {self.key} {state} uses={self.uses}>"

    # -- used by the Exchange ----------------------------------------------------------------
    def begin(self, exchange: Exchange, no_body: bool) -> None:
        """Start a request; the exchange writes it."""
        self.exchange = exchange
        self.lines = [b""]
        self.special = []
        self.length = None
        self.no_body = no_body
        self.head_done = self.eof_body = False
        self.head_bytes = 0
        self.uses += 1

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_data(data)
            return
        ex = self.exchange
        if ex is None:  # bytes on an idle connection
            self._out_of_sync()
            return
        client = ex.client
        client.wbuf = []  # one write to the client for everything this read produces
        ex.last_activity = monotonic()  # the read's time: its callbacks need no clock of their own
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.exchange is ex:
                ex.on_upgrade(self, data[exc.args[0]:] if exc.args else b"")
            else:  # released or dropped during this read, and bytes past its response
                self._out_of_sync()
            return
        except HttpParserError as exc:
            if self.exchange is ex:
                self.closed = True
                cause = exc.__context__  # what a callback raised (httptools chains it)
                ex.upstream_failed(cause if isinstance(cause, UpstreamBadResponse)
                                   else UpstreamBadResponse(f"malformed upstream response: {exc}"), self)
            else:  # released or dropped during this read, and bytes past its response
                self._out_of_sync()
            return
        finally:
            if not client.closed:
                client.flush()
            else:
                client.wbuf = None
        if not self.head_done and self.exchange is ex:
            # llhttp keeps what a head has so far: bound what an upstream can make us hold
            self.head_bytes += len(data)
            if self.head_bytes > self.pool.max_head_bytes:
                self.closed = True
                ex.upstream_failed(UpstreamBadResponse(
                    f"response head over {self.pool.max_head_bytes} bytes"), self)
                return
        if self.reset_parser:
            self.reset_parser = False
            self.parser = HttpResponseParser(self)
        if ex.need_idle:
            ex.need_idle = False
            if not ex.done:
                ex._arm_idle()

    def _out_of_sync(self) -> None:
        """Bytes past the response of a connection serving no request: never reuse it."""
        if self.idle:
            self.pool.discard(self)  # out of the idle stack too
        else:
            self.abort()  # already dropped (discarded) while the read was parsed

    def eof_received(self) -> bool | None:
        """In a tunnel the upstream's half-close reaches the client, which may go on sending;
        once both sides have half-closed, closing ends the tunnel (connection_lost)."""
        ex = self.tunnel
        if ex is None or ex.client.eof:
            return None
        self.half_closed = True
        ex.upstream_data(b"")
        return True

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            return
        ex = self.exchange
        if ex is None:
            if self.idle:
                self.pool.forget(self)
            return
        if self.eof_body and self.head_done:
            ex.on_response_complete(self, False)
        else:
            ex.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.pause_reading("upstream")

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.resume_reading("upstream")

    # -- httptools callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a trailer field, after a chunked body: counted, never kept
            self.trailers += (name, b": ", value, b"\r\n")
            return
        size = len(name)
        maybe = size < len(_MAYBE_INTERPRETED) and _MAYBE_INTERPRETED[size]
        # lower_name: a shared object, so INTERPRETED's look-up reuses its hash
        lname = lower_name(name) if maybe else b""
        if lname not in INTERPRETED:
            self.lines += (name, b": ", value, b"\r\n")  # joined once, with the whole head
        elif lname == b"content-length":
            self.length = value
        elif value != b"keep-alive" or lname != b"connection":  # what nearly every upstream sends
            self.special.append((lname, value))

    def on_headers_complete(self) -> None:
        status = self.status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 1xx: stax answers `Expect` itself, so skip interim heads
            self.lines = [b""]
            self.special = []
            self.length = None
            return
        self.head_done = True
        ex = self.exchange
        # None: a response past the one asked for (the exchange was released in this read);
        # raising makes it a parser error, and data_received drops the connection
        assert ex is not None
        ex.on_response_head(self, status, self.lines, self.special)
        self.trailers.size = 0  # on_header's fields are trailers now (head_done)
        if self.no_body and self.exchange is ex:  # (not when ex refused the head)
            self.reset_parser = True  # llhttp would wait for the body a HEAD response lacks
            ex.on_response_complete(self, self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if not self.no_body:
            ex = self.exchange
            assert ex is not None
            ex.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.no_body or self.status == 101:
            return  # HEAD: already complete; 101: the tunnel starts in on_upgrade
        ex = self.exchange
        assert ex is not None
        ex.on_response_complete(self, self.parser.should_keep_alive())
