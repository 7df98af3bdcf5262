"""Forward (terminal stage): send the request to one endpoint of the resolved provider and
stream the response back. Callback-driven (no task per request): the client and upstream
protocols call into the Exchange as bytes arrive.

Retries: idempotent methods only, before any response byte, on another endpoint, only while
the request body is buffered whole (<= 64 KiB), within the retry budget.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any, Final

from resolver.errors import (
    Overloaded,
    RequestTimeout,
    StaxError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)

from ..deadlines import Deadlines, monotonic
from ..errors import STATUS_LINES, status_line
from ..outbox import Outbox
from ..request import IDEMPOTENT, Request
from .context import context_lines

if TYPE_CHECKING:
    from resolver.model import Endpoint
    from resolver.snapshot import Route

    from ..balancer import BudgetCell, EndpointHealth, RetryBudget
    from ..server_protocol import ClientConnection
    from ..stats import Stats
    from ..upstream_pool import UpstreamPool
    from ..upstream_protocol import UpstreamConnection

BODY_RETRY_LIMIT: Final = 64 * 1024
_LOCAL_EXHAUSTION: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
_NO_BODY_STATUS: Final = frozenset({101, 204, 304})
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_HOPS_LINES: Final = tuple(b"\r\nx-stax-hops: %d\r\n" % n for n in range(64))  # ends the traceparent line


class Forwarder:
    """Shared state of the terminal stage: pool, balancing, health, metrics hooks."""

    def __init__(self, pool: UpstreamPool, health: EndpointHealth, stats: Stats, budget: RetryBudget, *,
                 mode: str, tracing=None, access_log: bool = False) -> None:
        self.access_log = access_log
        self.tracing = tracing
        self.loop = asyncio.get_running_loop()  # cached: get_running_loop() costs a getpid()
        self.pool = pool
        self.health = health
        self.stats = stats
        self.budget = budget
        self.deadlines = Deadlines(self.loop)
        self.outbox = Outbox(self.loop)
        self.mode = mode

    def record(self, req: Request, status: int, duration: float, endpoint=None) -> None:
        """A finished request (forwarded, or answered by stax itself): metrics, access log."""
        self.stats.observe(req.route, status, duration)
        if self.access_log:
            from ..logs import log_access

            log_access(self.mode, req, status, duration, endpoint)

    def start(self, client: ClientConnection, req: Request) -> Exchange:
        route = req.route
        assert route is not None  # the route stage ran
        cached = route.budget  # Any on the Route (resolver/ does not import proxy/)
        cell: BudgetCell = self.budget.cell(route.service) if cached is None else cached
        if cached is None:
            route.budget = cell
        cell.requests += 1
        ex = Exchange(self, client, req)
        ex.start()
        return ex


class Exchange:
    __slots__ = (
        "fw", "client", "req", "route", "head", "body", "body_bytes", "body_done",
        "body_streamed", "conn", "attempt", "tried", "timer_on", "responded", "done", "resp_chunked",
        "resp_close", "status", "t0", "last_activity", "idle_timer", "endpoint", "connecting",
        "tunnel", "early", "cspan", "need_idle",
    )

    def __init__(self, fw: Forwarder, client: ClientConnection, req: Request) -> None:
        self.fw = fw
        self.client = client
        self.req = req
        self.route: Route = req.route  # type: ignore[assignment]  # checked by Forwarder.start
        self.head = _request_head(req, client)
        has_body = req.chunked or bool(req.content_length)
        self.body: list[bytes] | None = [] if has_body else None
        self.body_bytes = 0
        self.body_done = not has_body
        self.body_streamed = False  # some body went upstream unbuffered: no retry possible
        self.conn: UpstreamConnection | None = None
        self.attempt = 0
        self.tried: list | None = None  # endpoints of failed attempts, made on the first retry
        self.timer_on = False  # waiting in fw.deadlines for the response head
        self.idle_timer: asyncio.TimerHandle | None = None
        self.responded = False  # response head written to the client
        self.done = False
        self.resp_chunked = False
        self.resp_close = False
        self.status = 0
        self.t0 = self.last_activity = req.started
        self.endpoint: Endpoint | None = None
        self.connecting: asyncio.Future | None = None
        self.tunnel = False
        self.early: list[bytes] | None = None  # client bytes after an Upgrade head, before the 101 (b"": EOF)
        self.cspan: Any = None  # OpenTelemetry client span of the current attempt
        self.need_idle = False  # arm the body idle timer once this read is processed

    def __repr__(self) -> str:
        return f"<Exchange {self.req!r} attempt={self.attempt} responded={self.responded}>"

    # -- attempts ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.endpoint is not None:  # a retry: avoid what was tried
            if self.tried is None:
                self.tried = [self.endpoint]
            else:
                self.tried.append(self.endpoint)
        ep = self.fw.health.pick(self.route, self.tried)  # raises NoHealthyEndpoint
        self.endpoint = ep
        self.attempt += 1
        if self.fw.tracing is not None and self.req.span.is_recording():
            # an unsampled request gets no client spans (the SDK would drop them too): the
            # span id stax made for this hop goes upstream, with the unsampled flag
            self._trace_attempt(ep)
        # A retry takes a new connection: the failure may have been an idle one the upstream
        # was closing (its keep-alive timeout), and the other idle ones may be closing too.
        conn = self.fw.pool.acquire_idle(ep) if self.tried is None else None
        if conn is not None:
            self._attach(conn)
        else:
            self.connecting = asyncio.ensure_future(self._connect(ep))

    def _trace_attempt(self, ep) -> None:
        if self.cspan is not None:
            self.fw.tracing.end(self.cspan, 502, "attempt failed; retrying")
        old = self.req.span_id
        self.cspan, span_id = self.fw.tracing.client_span(self.req.span, self.req.env, self.route, ep,
                                                             self.attempt)
        self.head = self.head.replace(b"-" + old + b"-", b"-" + span_id + b"-", 1)
        self.req.span_id = span_id

    async def _connect(self, ep) -> None:
        try:
            conn = await self.fw.pool.connect(ep)
        except asyncio.CancelledError:
            return
        except (OSError, TimeoutError) as exc:
            self.connecting = None
            if self.done:
                return
            if getattr(exc, "errno", None) in _LOCAL_EXHAUSTION:
                # stax's own limits (open files, ports, memory), not the endpoint's fault: no
                # ejection, no retry (it would fail the same), and the status says overloaded
                self._fail(Overloaded(f"connect to {ep} failed: {_reason(exc)} (stax is out of local resources)"))
            else:
                self._attempt_failed(UpstreamUnavailable(f"connect to {ep} failed: {_reason(exc)}"), None)
            return
        self.connecting = None
        if self.done:
            self.fw.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        req = self.req
        data = self.head
        if self.body or (self.body_done and req.chunked):  # head and body in one write
            parts = [data]
            if self.body:
                parts.extend(_frame(chunk, req.chunked) for chunk in self.body)
            if self.body_done and req.chunked:
                parts.append(b"0\r\n\r\n")
            data = b"".join(parts)
        conn.begin(self, req.method == b"HEAD")
        if self.body_streamed:  # reading paused until now (feed_body): too big to keep for a retry
            self.body = None
            self.client.resume_reading("body")
        if self.body_done:
            self.fw.outbox.send(conn.transport, data)  # a whole request: sent at the end of the round
            # timeout_ms runs from the request fully sent to the response head received
            self.timer_on = True
            self.fw.deadlines.add(self, self.route.timeout_s)
        else:
            conn.transport.write(data)  # the body follows on this transport: no holding back
            self._arm_idle()

    def _attempt_failed(self, err: StaxError, conn: UpstreamConnection | None) -> None:
        if self.timer_on:
            self.timer_on = False
            self.fw.deadlines.waiting.pop(self, None)
        if conn is not None:
            self.fw.pool.discard(conn)
            self.conn = None
        self.fw.health.failure(self.endpoint, self.route)
        req = self.req
        if (not self.responded and self.attempt <= self.route.retries
                and req.method in IDEMPOTENT and not self.body_streamed
                and (self.body_done or self.body is None)
                and self.fw.budget.allow_retry(self.route.service)):
            try:
                self.start()
                return
            except StaxError:
                pass
        self._fail(err)

    def timed_out(self) -> None:
        """Called by fw.deadlines: no response head within timeout_ms."""
        self.timer_on = False
        if self.done or self.responded:
            return
        self._attempt_failed(
            UpstreamTimeout(f"{self.route.service} did not answer within {self.route.timeout_s:g}s"),
            self.conn)

    # -- request body (client -> upstream) ---------------------------------------------------
    def feed_body(self, chunk: bytes) -> None:
        self.last_activity = monotonic()
        conn = self.conn
        body = self.body
        if body is not None:
            self.body_bytes += len(chunk)
            if self.body_bytes <= BODY_RETRY_LIMIT:
                body.append(chunk)  # kept for a retry
            else:
                self.body = None
                if conn is None:  # not attached yet: keep the bytes, stop reading more
                    body.append(chunk)
                    self.body = body
                    self.body_streamed = True
                    self.client.pause_reading("body")
                    return
                self.body_streamed = True
        elif conn is None:
            return
        if conn is not None:
            conn.transport.write(_frame(chunk, self.req.chunked))

    def end_body(self) -> None:
        self.body_done = True
        if self.conn is not None:
            if self.req.chunked:
                self.conn.transport.write(b"0\r\n\r\n")
            if not self.responded and not self.timer_on:
                self.timer_on = True
                self.fw.deadlines.add(self, self.route.timeout_s)

    # -- response (upstream -> client) -------------------------------------------------------
    def on_response_head(self, conn: UpstreamConnection, status: int, lines: list[bytes],
                         special: list[tuple[bytes, bytes]]) -> None:
        """`lines`: [placeholder, then name, ": ", value, CRLF per forwarded header];
        `special`: (lowercased name, value) of the other headers stax interprets (hop-by-hop,
        X-Stax-Route); Content-Length is `conn.length`."""
        if self.timer_on:
            self.timer_on = False
            self.fw.deadlines.waiting.pop(self, None)
        if status == 101 and self.req.upgrade is None:  # refused before a byte reaches the client
            self.upstream_failed(UpstreamBadResponse("upstream switched protocols unasked"), conn)
            return
        self.status = status
        if self.fw.health.state:  # some endpoint has failed: a success resets its count
            self.fw.health.success(self.endpoint)
        req = self.req
        client = self.client
        lines[0] = STATUS_LINES.get(status) or status_line(status)
        out = lines
        theirs = None
        length = conn.length
        te = None  # the upstream's Transfer-Encoding
        upgrade = b""
        extra_hop = None
        for lname, value in special:
            if lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    self.resp_close = True
                tokens -= _CONNECTION_OPTIONS
                if tokens:  # names other headers as hop-by-hop: filter them below
                    extra_hop = tokens if extra_hop is None else extra_hop | tokens
            elif lname == b"transfer-encoding":
                te = value if te is None else te + b", " + value
            elif lname == b"x-stax-route":
                theirs = value if theirs is None else theirs + b"," + value
            elif lname == b"upgrade":
                upgrade = value
        if extra_hop:
            kept = [out[0]]
            for i in range(1, len(out), 4):  # name, ": ", value, CRLF
                if out[i].lower() not in extra_hop:
                    kept += out[i:i + 4]
            out = kept
        if status == 101:
            out.append(b"connection: upgrade\r\nupgrade: " + upgrade + b"\r\n")
        if theirs is None:
            out.append(self.route.line)
        else:
            out.append(b"x-stax-route: " + self.route.header + b"," + theirs + b"\r\n")
        no_body = status in _NO_BODY_STATUS or req.method == b"HEAD"
        if no_body:
            if te is not None and req.method == b"HEAD":
                out.append(b"transfer-encoding: " + te + b"\r\n")
            elif length is not None and status != 204:  # a 204 has no Content-Length (RFC 9110 8.6)
                out.append(b"content-length: " + length + b"\r\n")
        elif length is not None:  # llhttp refuses Content-Length with Transfer-Encoding
            out.append(b"content-length: " + length + b"\r\n")
        else:
            # Re-framed for the client: chunked, after any other coding the upstream applied
            # (gzip, chunked); without chunked last, the upstream's body runs to its close.
            if te is None or te == b"chunked":
                conn.eof_body = te is None
                codings = _CHUNKED_LINE
            else:
                codings, conn.eof_body = _codings(te)
            if client.http_version(req) == "1.1":
                self.resp_chunked = True
                out.append(codings)
            else:
                client.close_after = True
        if req.upgrade is not None and status != 101:
            client.close_after = True  # the client's parser stopped at the Upgrade head
        elif not self.body_done and req.long_body:
            client.close_after = True  # answered early: the rest of the body will not be read
        if status != 101 and (client.close_after or not req.keep_alive):  # drain sets close_after
            client.close_after = True
            out.append(b"connection: close\r\n")
        elif req.echo_keep_alive:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.responded = True
        wbuf = client.wbuf
        assert wbuf is not None  # set for the upstream read: coalesced
        wbuf.extend(out)
        if not no_body:
            # Most bodies complete in the same read as the head: arming the idle timer after
            # the read (UpstreamConnection.data_received) spares a timer per request.
            self.need_idle = True

    def on_response_body(self, chunk: bytes) -> None:
        """Inside the upstream read, like the head: appended to what it writes at its end
        (the read set last_activity)."""
        wbuf = self.client.wbuf
        assert wbuf is not None  # set for the read
        if self.resp_chunked:
            wbuf.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            wbuf.append(chunk)

    def on_response_complete(self, conn: UpstreamConnection, keep_alive: bool) -> None:
        if self.done:
            return
        if self.resp_chunked:
            self.client.write(b"0\r\n\r\n")
        if self.timer_on or self.idle_timer is not None:  # rarely: most bodies end in the head's read
            self._cancel_timers()
        self.conn = None
        if keep_alive and not self.resp_close and self.body_done:
            self.fw.pool.release(conn)
        else:
            self.fw.pool.discard(conn)
        self._finish()

    # -- Upgrade (WebSocket and friends): after a 101, a byte tunnel both ways -----------------
    def on_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        if self.status != 101 or self.req.upgrade is None:
            self.upstream_failed(UpstreamBadResponse("upstream switched protocols unasked"), conn)
            return
        self.tunnel = True
        conn.tunnel = self
        self.client.tunnel = self
        self.last_activity = monotonic()
        if rest:
            self.client.write(rest)
        for chunk in self.early or ():
            _relay(conn.transport, chunk)  # b"": the client half-closed before the 101
        self.early = None
        if "upgrade" in self.client.paused:
            self.client.resume_reading("upgrade")
        self._arm_idle()

    def client_data(self, data: bytes) -> None:
        """Raw client bytes once the client parser has handed over (after an Upgrade head);
        b"": the client half-closed."""
        self.last_activity = monotonic()
        if self.tunnel:
            _relay(self.conn.transport, data)  # type: ignore[union-attr]  # a tunnel has its conn
        else:
            if self.early is None:
                self.early = [data]
            else:
                self.early.append(data)  # passed on in order once the 101 arrives (on_upgrade)
            self.body_bytes += len(data)  # an Upgrade request has no body: these are its bytes
            if self.body_bytes > BODY_RETRY_LIMIT:  # held, not streamed: stop reading for now
                self.client.pause_reading("upgrade")

    def upstream_data(self, data: bytes) -> None:
        """Raw upstream bytes in a tunnel; b"": the upstream half-closed."""
        self.last_activity = monotonic()
        if not self.client.closed:
            _relay(self.client.transport, data)  # in a tunnel the client's wbuf is never set

    def tunnel_closed(self) -> None:
        """Either side of a tunnel closed: close the other, count the request once."""
        if self.done:
            return
        self._cancel_timers()
        self.done = True
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.tunnel = None
            self.fw.pool.discard(conn)
        self._record(101)
        self.client.tunnel_done(self)

    def upstream_failed(self, err: StaxError, conn: UpstreamConnection) -> None:
        if self.done:
            self.fw.pool.discard(conn)
            return
        if self.responded:
            self.fw.pool.discard(conn)
            self._abort_client()
            return
        self._attempt_failed(err, conn)

    def upstream_lost(self, conn: UpstreamConnection, exc) -> None:
        if self.done:
            return
        if self.responded:  # a body that ends short must never look complete
            self.conn = None
            self.fw.pool.discard(conn)
            self._abort_client()
            return
        reason = _reason(exc) if exc else "connection closed before a response"
        self._attempt_failed(UpstreamUnavailable(f"{self.endpoint}: {reason}"), conn)

    # -- idle timeout inside bodies ----------------------------------------------------------
    def _arm_idle(self) -> None:
        if self.idle_timer is None:
            self.idle_timer = self.fw.loop.call_later(self.route.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.done:
            return
        if not self.responded and self.body_done:
            return  # waiting for the response head: timeout_ms governs; re-armed at the head
        idle = monotonic() - self.last_activity
        if idle >= self.route.idle_timeout_s:
            if self.tunnel:
                self.client.abort()
                self.tunnel_closed()
                return
            if self.conn is not None:
                self.fw.pool.discard(self.conn)
                self.conn = None
            if self.responded:
                self._abort_client()
            elif self.client.paused:  # the upstream stopped reading the body
                self._fail(UpstreamTimeout(
                    f"upstream read no request body for {self.route.idle_timeout_s:g}s"))
            else:
                self._fail(RequestTimeout(
                    f"client sent no request body for {self.route.idle_timeout_s:g}s"))
        else:
            self.idle_timer = self.fw.loop.call_later(self.route.idle_timeout_s - idle, self._check_idle)

    # -- endings -----------------------------------------------------------------------------
    def _cancel_timers(self) -> None:
        if self.timer_on:
            self.timer_on = False
            self.fw.deadlines.waiting.pop(self, None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _finish(self) -> None:
        self.done = True
        # _record, inline; ended at the upstream read that completed the response
        self.fw.record(self.req, self.status, self.last_activity - self.t0, self.endpoint)
        if self.fw.tracing is not None:
            self._end_spans(self.status, None)
        self.client.exchange_done(self)

    def _fail(self, err: StaxError) -> None:
        self._cancel_timers()
        self.done = True
        self.status = err.status
        self._record(err.status)
        if self.fw.tracing is not None:
            self._end_spans(err.status, err.code)
        self.client.exchange_failed(self, err)

    def _abort_client(self) -> None:
        self._cancel_timers()
        self.done = True
        self._record(502)
        if self.fw.tracing is not None:
            self._end_spans(502, "response aborted")
        self.client.abort()

    def _record(self, status: int) -> None:
        self.fw.record(self.req, status, monotonic() - self.t0, self.endpoint)

    def _end_spans(self, status: int, error: str | None) -> None:
        end = self.fw.tracing.end
        end(self.cspan, status, error)
        self.cspan = None
        end(self.req.span, status, error)
        self.req.span = None

    def client_lost(self) -> None:
        """The client went away: drop the upstream side, never reuse it."""
        if self.tunnel:
            self.tunnel_closed()
            return
        if self.done:
            return
        self._cancel_timers()
        self.done = True
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            self.fw.pool.discard(self.conn)
            self.conn = None

    def pause_upstream(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.transport.resume_reading()


_CHUNKED_LINE: Final = b"transfer-encoding: chunked\r\n"


def _codings(te: bytes) -> tuple[bytes, bool]:
    """For an upstream's Transfer-Encoding `te`: the client's line (its codings, chunked last)
    and whether the upstream's body runs to its close (chunked is not its last coding)."""
    tokens = [t.strip() for t in te.split(b",") if t.strip()]
    to_close = not tokens or tokens[-1].lower() != b"chunked"
    if not to_close:
        tokens.pop()
    return b"transfer-encoding: " + b"".join(t + b", " for t in tokens) + b"chunked\r\n", to_close


def _relay(transport, data: bytes) -> None:
    """One side's bytes to the other in a tunnel; b"" passes on a half-close."""
    if data:
        transport.write(data)
    elif transport.can_write_eof():
        transport.write_eof()


def _frame(chunk: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _request_head(req: Request, client: ClientConnection) -> bytes:
    """The upstream request head: hop-by-hop dropped, context headers rewritten."""
    out = [req.method, b" ", req.path, b" HTTP/1.1\r\n"]
    skip = req.hop_names  # NOT_COPIED, plus names listed in Connection
    for lname, name, value in req.headers:
        if lname in skip:
            continue
        out += (name, b": ", value, b"\r\n")  # joined once below: no bytes per line
    # one extend per branch (a tuple less); the context lines end in the traceparent's prefix
    hops = _HOPS_LINES[req.hops] if req.hops < 64 else b"\r\nx-stax-hops: %d\r\n" % req.hops
    parsed = req.parsed
    if parsed is not None and parsed.at >= 0:  # the baggage goes upstream as received
        values = req.h_baggage
        assert values is not None  # the one value parsed
        raw = values[0]
        out += (b"x-stax-env: ", raw[parsed.at:parsed.end], b"\r\nbaggage: ", raw,
                b"\r\ntraceparent: 00-", req.trace_id, b"-", req.span_id, b"-", req.trace_flags, hops)
    else:
        lines = parsed.lines if parsed is not None else None
        if lines is None:  # no stax.env in the baggage (or no baggage): the env came from elsewhere
            lines = context_lines(req.env, parsed.others if parsed is not None else b"")  # type: ignore[arg-type]
        out += (lines, req.trace_id, b"-", req.span_id, b"-", req.trace_flags, hops)
    if req.h_xff is None and req.h_xfp is None:
        out.append(client.forwarded)
    else:  # a trusted proxy's X-Forwarded-* (sanitize dropped anyone else's): extend them
        xff = req.peer.encode() if req.h_xff is None else req.h_xff + b", " + req.peer.encode()
        out.append(b"x-forwarded-for: %b\r\nx-forwarded-proto: %b\r\n" % (xff, req.h_xfp or client.scheme))
    if req.upgrade is not None:
        out.append(b"connection: upgrade\r\nupgrade: " + req.upgrade + b"\r\n")
    if req.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    elif req.content_length is not None:
        out.append(b"content-length: %d\r\n" % req.content_length)
    out.append(b"\r\n")
    return b"".join(out)
