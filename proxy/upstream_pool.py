"""Keep-alive connections per endpoint: a LIFO stack of idle connections with a maximum size
and an idle timeout. A connection the upstream closed while idle is dropped on the spot
(connection_lost), and a checkout skips anything already closing."""

from __future__ import annotations

import asyncio
import ssl as _ssl

from resolver.model import Endpoint

from .deadlines import monotonic
from .upstream_protocol import UpstreamConnection


class UpstreamPool:
    def __init__(self, *, max_idle_per_endpoint: int = 128, idle_timeout: float = 60.0,
                 connect_timeout: float = 5.0, ssl_context: _ssl.SSLContext | None = None,
                 max_head_bytes: int = 64 * 1024) -> None:
        self.max_idle = max_idle_per_endpoint
        self.max_head_bytes = max_head_bytes  # largest response head its connections accept
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self.active = 0
        self.connects_total = 0

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"<UpstreamPool endpoints={len(self._idle)} idle={idle} active={self.active}>"

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def acquire_idle(self, ep: Endpoint) -> UpstreamConnection | None:
        stack = self._idle.get(ep.address)
        while stack:
            conn = stack.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.idle = False
                self.active += 1
                return conn
        return None

    async def connect(self, ep: Endpoint) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host = ep.host[1:-1] if ep.host.startswith("[") else ep.host
        ssl_ctx = None
        if ep.scheme == "https":
            ssl_ctx = self.ssl_context or _default_ssl()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self, ep.address), host, ep.port,
                                   ssl=ssl_ctx, server_hostname=host if ssl_ctx else None),
            self.connect_timeout,
        )
        self.connects_total += 1
        self.active += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response completed cleanly."""
        self.active -= 1
        conn.exchange = None
        if conn.closed or conn.transport.is_closing():
            return
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= self.max_idle:
            conn.transport.close()
            return
        conn.idle = True
        conn.idle_since = -1.0  # stamped by the next sweep: no clock read per request
        stack.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection that must not be reused (error, short body, timeout)."""
        if conn.idle:  # bytes arrived after its response: out of sync
            self.forget(conn)
        else:
            self.active -= 1
        conn.exchange = None
        conn.idle = False
        conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        """An idle connection was closed by the upstream."""
        stack = self._idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)

    def sweep(self) -> None:
        """Close idle connections past the idle timeout (called by the server's 1 s sweeper;
        up to a sweep late, never early)."""
        now = monotonic()
        cutoff = now - self.idle_timeout
        for key, stack in list(self._idle.items()):
            keep = []
            for conn in stack:
                if conn.closed:
                    conn.transport.close()
                elif conn.idle_since < 0:  # released since the last sweep
                    conn.idle_since = now
                    keep.append(conn)
                elif conn.idle_since < cutoff:
                    conn.transport.close()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.transport.close()
        self._idle.clear()


_SSL: _ssl.SSLContext | None = None


def _default_ssl() -> _ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = _ssl.create_default_context()
    return _SSL


def make_ssl_context(ca_file: str | None) -> _ssl.SSLContext | None:
    if not ca_file:
        return None
    return _ssl.create_default_context(cafile=ca_file)
