"""The client side of a stax listener: an asyncio.Protocol fed to httptools' C parser.

One request is handled at a time per connection; pipelined requests queue behind it with
their bodies (reading pauses while one waits). Everything stax answers itself goes through
`send_error`, the single place errors become responses.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from resolver.errors import BadRequest, HeadersTooLarge, Overloaded, RequestTimeout, StaxError

from .deadlines import monotonic
from .errors import error_response, rescue
from .memo import lower_name
from .request import LONG_BODY, Request
from .trailers import TrailerSink

if TYPE_CHECKING:
    from .listener import Listener
    from .stages.forward import Exchange

# How long a connection closed with a request body still coming discards what the client
# sends before closing for good (nginx's lingering_timeout is 5 s too).
LINGER_S: Final = 5.0
MAX_PIPELINED: Final = 256  # requests queued behind the one in flight on a connection (~100 KB)


class _Queued:
    __slots__ = ("req", "chunks", "complete")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.chunks: list[bytes] = []
        self.complete = False


class ClientConnection(asyncio.Protocol):
    def __init__(self, listener: Listener, scheme: bytes) -> None:
        self.server = listener
        self.scheme = scheme
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it
        self.parser = HttpRequestParser(self)
        self.peer = ""
        self.forwarded = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # the head's: the Request's once parsed
        self.head_bytes = 0  # bytes of the current head read while it was incomplete (-1: begun in this read)
        self.read_len = 0  # length of the read being parsed
        self.in_head = False
        self.exchange: Exchange | None = None  # the request being forwarded
        self.current: _Queued | None = None  # a request whose body must be consumed (error path)
        self.swallowed = 0  # bytes of current's body dropped so far (bounded by LONG_BODY)
        self.queue: deque[_Queued] = deque()
        self.close_after = False
        self.closed = False
        self.paused: set[str] = set()
        self.deadline = 0.0  # header-read or keep-alive deadline (-1: idle, not yet stamped)
        self.tunnel: Exchange | None = None  # the Exchange relaying raw bytes after an Upgrade
        # Set while an upstream read is processed: what it produces for this client, written
        # once at the end (the Exchange's response callbacks, which only run then, append here).
        self.wbuf: list[bytes] | None = None
        self.deferred_error: StaxError | None = None
        self.eof = False  # the client half-closed: close once its requests are answered
        self.lingering = False  # closed, FIN sent, discarding a body until the client closes
        cfg = listener.config  # read on every request: kept at hand
        self.header_timeout = cfg.header_timeout
        self.keepalive_timeout = cfg.keepalive_timeout
        self.max_head_bytes = cfg.max_head_bytes
        self.trailers = TrailerSink(cfg.max_head_bytes, HeadersTooLarge)

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer} exchange={self.exchange!r} queued={len(self.queue)}>"

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        # what the upstream head says of this client when no trusted proxy said it first
        self.forwarded = b"x-forwarded-for: %b\r\nx-forwarded-proto: %b\r\n" % (
            self.peer.encode(), self.scheme)
        self.server.connections.add(self)
        self.deadline = monotonic() + self.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tunnel is not None:
            self.tunnel.client_data(data)
            return
        self.read_len = len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # llhttp stops after an Upgrade (or CONNECT) head; what follows is not HTTP.
            ex = self.exchange
            if ex is not None and ex.req.upgrade is not None:
                self.tunnel = ex
                rest = data[exc.args[0]:] if exc.args else b""
                if rest:
                    ex.client_data(rest)
            elif self.exchange is None and not self.closed:
                self.close()
            return
        except HttpParserError as exc:
            cause = exc.__context__  # what a callback raised (httptools chains it)
            self._refuse(cause if isinstance(cause, StaxError)
                         else BadRequest(f"malformed request: {_parser_reason(exc)}"))
            return
        if self.in_head and not self.closed:
            # A partial head: its clock starts now (a head read whole never needs one), and
            # llhttp buffers it: bound what a client can make us hold.
            if self.head_bytes < 0:
                # begun in this read, maybe after a body or other requests: count its own bytes
                self.deadline = monotonic() + self.header_timeout
                self.head_bytes = self._held_head_bytes(data)
            else:
                self.head_bytes += self.read_len
            if self.head_bytes > self.max_head_bytes:
                self._refuse(HeadersTooLarge(f"request head over {self.max_head_bytes} bytes"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            return
        if self.exchange is not None:
            self.exchange.client_lost()
            self.exchange = None
            self.server.release()

    def eof_received(self) -> bool | None:
        """A client that half-closes after its requests still gets the responses."""
        self.eof = True
        if self.closed:
            return None  # lingering: the client is done sending; close now
        if self.tunnel is not None:
            conn = self.tunnel.conn
            if conn is not None and conn.half_closed:
                return None  # both sides have half-closed: closing ends the tunnel
            # not before the 101 and the bytes sent ahead of it: the Exchange keeps the order
            self.tunnel.client_data(b"")
            return True
        if self.exchange is not None and not self.exchange.body_done:
            return None  # gone mid-body: the request can never complete
        if self.queue and not self.queue[-1].complete:
            return None
        if self.exchange is not None or self.queue:
            return True
        return None

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_upstream()

    # -- flow control ------------------------------------------------------------------------
    def pause_reading(self, reason: str) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            if self.wbuf is not None:
                self.wbuf.append(data)  # coalesced: flushed once when the upstream read ends
            else:
                self.transport.write(data)

    def flush(self) -> None:
        buf = self.wbuf
        self.wbuf = None
        if buf:
            if len(buf) == 1:
                self.transport.write(buf[0])
            elif len(buf[-1]) > 4096:  # a big body chunk: one writev, no copy into a join
                self.transport.writelines(buf)
            else:
                self.transport.write(b"".join(buf))

    def close(self, linger: bool = False) -> None:
        """`linger`: the client may still be sending (a body stax will not read, requests
        pipelined behind the last one answered). Closing at once would answer its next bytes,
        or those already here and unread, with a reset, and a reset can destroy the response
        before the client has read it. So: send everything, then FIN, and discard what
        arrives until the client closes or LINGER_S pass (a lingering close, as nginx does)."""
        self.flush()
        was_open, self.closed = not self.closed, True
        transport = self.transport
        if (linger and was_open and not self.eof and not transport.is_closing()
                and transport.can_write_eof()):  # TLS cannot half-close: closed at once
            self.lingering = True
            transport.write_eof()
            if self.paused:
                self.paused.clear()
                transport.resume_reading()  # data_received drops what comes: self.closed
            self.deadline = monotonic() + LINGER_S
            return
        transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        ex = self.exchange
        if ex is not None and ex.req.version is None:
            # a pipelined request begins: llhttp still holds the one in flight's version
            ex.req.version = self.parser.get_http_version()
        self.in_head = True
        self.head_bytes = -1  # begun in the read being parsed (data_received)
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((lower_name(name), name, value))
        else:  # a trailer field, after a chunked body: counted, never kept (TrailerSink)
            self.trailers.append((name, name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.deadline = 0.0
        if self.closed:
            return
        # The head lies within the reads counted so far and this one: only when those exceed
        # the limit (a large body or pipelined requests in the same read) is it measured.
        if (self.head_bytes + self.read_len > self.max_head_bytes
                and self._parsed_head_bytes() > self.max_head_bytes):
            # stops llhttp: nothing after this head is parsed (data_received refuses it)
            raise HeadersTooLarge(f"request head over {self.max_head_bytes} bytes")
        parser = self.parser
        pipelined = self.exchange is not None or self.current is not None or self.queue
        # The HTTP version is read only when a response needs it (get_http_version() costs
        # 2% of a request), except for a pipelined request: see http_version.
        req = Request(parser.get_method(), self.url, parser.get_http_version() if pipelined else None,
                      self.headers, parser.should_keep_alive(), self.peer, self.scheme, monotonic())
        self.trailers.size = 0  # on_header's fields from here on are trailers
        if pipelined:
            if len(self.queue) >= MAX_PIPELINED:
                # llhttp parses a whole read ahead: without a bound, 256 KiB of tiny requests
                # would queue ~10,000 (MBs held per connection); stops llhttp, answered in turn
                raise Overloaded(f"more than {MAX_PIPELINED} pipelined requests waiting")
            self.queue.append(_Queued(req))  # wait for the one in flight
            self.pause_reading("pipeline")
            return
        self._handle(req)

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(n) + len(v) + 4 for _, n, v in self.headers)

    def _held_head_bytes(self, data: bytes) -> int:
        """What is held of a head begun in `data` and not complete: its lines parsed, and
        its last line still coming (the request line, when no header line is complete)."""
        partial = len(data) - 1 - data.rfind(b"\n")
        return partial + self._parsed_head_bytes() if self.headers else max(partial, len(self.url))

    def http_version(self, req: Request) -> str:
        """`req`'s HTTP version ("1.1"). llhttp still holds it: a request is handled at once
        only when none is in flight, and a pipelined one saves the version of the one in
        flight (on_message_begin) before llhttp reads its own."""
        if req.version is None:
            req.version = self.parser.get_http_version()
        return req.version

    def on_body(self, body: bytes) -> None:
        if self.closed:
            return
        if self.queue:
            self.queue[-1].chunks.append(body)
        elif self.exchange is not None:
            self.exchange.feed_body(body)
        elif self.current is not None:  # answered before its body ended: dropped, up to a bound
            self.swallowed += len(body)
            if self.swallowed > LONG_BODY:  # a chunked body that goes on: stop reading it
                self.close(linger=True)

    def on_message_complete(self) -> None:
        if self.closed:
            return
        if self.queue:
            self.queue[-1].complete = True
        elif self.exchange is not None:
            if not self.exchange.body_done:  # a request without a body was done at its head
                self.exchange.end_body()
        elif self.current is not None:
            self.current = None  # the errored request's body is consumed: keep-alive is safe
            self._next()

    # -- request handling --------------------------------------------------------------------
    def _handle(self, req: Request, chunks: list | None = None, complete: bool = True) -> None:
        srv = self.server
        if srv.draining:
            self.close_after = True
        try:
            srv.admit()
        except StaxError as err:
            self._reject(req, err, chunks, complete)
            return
        try:
            for stage in srv.stages:
                stage(req)
            if srv.tracing is not None:
                req.span = srv.tracing.server_span(req, srv.name)
            if req.expect_continue and req.has_body and chunks is None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.exchange = srv.forwarder.start(self, req)
        except StaxError as err:
            srv.release()
            self._reject(req, err, chunks, complete)
            return
        except Exception as exc:  # a bug must not take the proxy down: answer and log
            srv.release()
            srv.log_exception("request pipeline failed", exc)
            self._reject(req, rescue(exc), chunks, complete)
            return
        if chunks is not None and self.exchange is not None:
            for chunk in chunks:
                self.exchange.feed_body(chunk)
            if complete:
                self.exchange.end_body()

    def _reject(self, req: Request, err: StaxError, chunks, complete: bool) -> None:
        body_pending = req.has_body and not (chunks is not None and complete)
        if body_pending and req.long_body:
            close = True  # not worth reading a large body just to keep the connection
        else:
            # a head we could not make sense of: framing may be ambiguous too, so do not reuse
            close = isinstance(err, (BadRequest, HeadersTooLarge))
        self.server.forwarder.record(req, err.status, monotonic() - req.started)
        if self.server.tracing is not None:
            if req.span is None:
                req.span = self.server.tracing.server_span(req, self.server.name)
            self.server.tracing.end(req.span, err.status, err.code)
            req.span = None
        route = req.route.header if req.route is not None else None
        self.send_error(req, err, close=close or not req.keep_alive, route_header=route)
        if not close and body_pending:
            self._swallow(req)

    def _refuse(self, err: StaxError) -> None:
        """The client's bytes cannot be read on (a malformed, too large or too slow head):
        `err`, then a lingering close. Requests complete before it are answered first, in order."""
        ex = self.exchange
        if ex is not None and ex.body_done and all(q.complete for q in self.queue):
            self.deferred_error = err  # sent by _next once the queue is empty
            self.deadline = 0.0
            self.pause_reading("error")
            return
        if ex is not None and ex.responded:
            self.abort()  # a broken body mid-stream: nothing sane to send
            return
        if ex is not None:
            ex.client_lost()
            self.exchange = None
            self.server.release()
        self.send_error(None, err, close=True)

    def send_error(self, req: Request | None, err: StaxError, *, close: bool,
                   route_header: bytes | None = None) -> None:
        """`close`: then close, lingering: whatever the client sent after the refused
        request (its body, requests pipelined behind it) is unread, and a plain close would
        answer it with a reset that can destroy this response."""
        srv = self.server
        srv.stats.error(err.code)
        close = close or self.close_after or srv.draining
        head_only = req is not None and req.method == b"HEAD"
        self.write(error_response(err, route_header=route_header, close=close, head_only=head_only,
                                  keep_alive=req is not None and req.echo_keep_alive))
        srv.log_error(req, err, self.peer)
        if close:
            self.close(linger=True)
        elif self.current is None:
            self._next()

    def exchange_done(self, ex: Exchange) -> None:
        self.exchange = None
        self.server.release()
        if self.paused:
            self._exchange_over()
        if not ex.body_done:  # the upstream answered before the client finished its body
            self._unread_body(ex.req)
            return
        if self.close_after or not ex.req.keep_alive:
            # A keep-alive client may have sent (or be sending) its next requests: closing
            # with them unread would answer with a reset, which can destroy this response.
            self.close(linger=ex.req.keep_alive or bool(self.queue))
            return
        if self.queue:
            # Pipelined: start the next request after the upstream read that completed this
            # one. Until that read is parsed, its connection may still prove out of sync.
            self.server.forwarder.loop.call_soon(self._next_soon)
        elif self.deferred_error is None and not self.eof:
            self.deadline = -1.0  # idle (what _next does here, without the call)
        else:
            self._next()

    def _unread_body(self, req: Request) -> None:
        """Read the rest of the body, then go on; or close (lingering) when the response said
        so (Exchange.on_response_head sets close_after for a long body)."""
        if self.close_after or not req.keep_alive:
            self.close(linger=True)
            return
        self._swallow(req)

    def _swallow(self, req: Request) -> None:
        """Drop the rest of `req`'s body (on_body), then go on (on_message_complete)."""
        self.current = _Queued(req)
        self.swallowed = 0

    def _exchange_over(self) -> None:
        """Reading paused for an exchange (its body waiting for a connection, or a slow
        upstream) resumes when it ends, or the connection's next request is never read."""
        self.paused.discard("body")
        self.paused.discard("upstream")
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    def _next_soon(self) -> None:
        if not self.closed and self.exchange is None:
            self._next()

    def tunnel_done(self, ex: Exchange) -> None:
        self.tunnel = None
        self.exchange = None
        self.server.release()
        self.close()

    def exchange_failed(self, ex: Exchange, err: StaxError) -> None:
        self.exchange = None
        self.server.release()
        if self.paused:
            self._exchange_over()
        pending = not ex.body_done
        self.send_error(ex.req, err, close=pending or not ex.req.keep_alive,
                        route_header=ex.route.header)

    def _next(self) -> None:
        if not self.queue and self.deferred_error is not None:
            err, self.deferred_error = self.deferred_error, None
            self.send_error(None, err, close=True)
            return
        if not self.queue and self.eof:
            self.close()
            return
        if self.queue:
            item = self.queue.popleft()
            if not self.queue:
                self.resume_reading("pipeline")
            self._handle(item.req, item.chunks, item.complete)
        else:
            self.deadline = -1.0  # idle: the sweeper starts the keep-alive clock

    def check_deadline(self, now: float) -> None:
        """Called by the sweeper every second: header-read timeout (408) and keep-alive idle
        close (up to a sweep late, never early, and no clock read per request)."""
        if self.deadline < 0:
            self.deadline = now + self.keepalive_timeout
        elif self.lingering:
            if now >= self.deadline:
                self.transport.close()  # the client had LINGER_S to read the response
        elif self.deadline and now >= self.deadline and not self.closed:
            if self.in_head:
                self._refuse(RequestTimeout("request head not received in time"))
            elif self.exchange is None and not self.queue:
                self.close()


def _parser_reason(exc: HttpParserError) -> str:
    text = str(exc) or type(exc).__name__
    if "PRI" in text:  # llhttp's words for the HTTP/2 connection preface
        return "HTTP/2 with prior knowledge is not supported; speak HTTP/1.1"
    return text[:120]
