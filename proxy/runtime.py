"""A running proxy process: graph source, shared upstream state, listeners, admin, drain.

`Runtime` owns what every listener shares (snapshot cell, pool, endpoint health, retry
budget, admission, metrics); a `Listener` (proxy/listener.py) is one port with its own
stage list.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING

from resolver.sources.file import FileSource
from resolver.sync import SnapshotCell

from .admission import Admission
from .balancer import EndpointHealth, RetryBudget
from .config import ProxyConfig
from .listener import Listener
from .server_protocol import ClientConnection
from .upstream_pool import UpstreamPool, make_ssl_context

if TYPE_CHECKING:
    from .otel import Tracing

log = logging.getLogger("stax.proxy")


class Runtime:
    def __init__(self, config: ProxyConfig, *, cell: SnapshotCell | None = None,
                 tracer_provider=None) -> None:
        self.config = config
        self.own_tracer_provider = None  # one made here is flushed and shut down in stop()
        if tracer_provider is None:
            from .otel import provider_from_config

            tracer_provider = self.own_tracer_provider = provider_from_config(
                config.otel_traces_exporter)
        self.tracing: Tracing | None = None
        if tracer_provider is not None:
            from .otel import Tracing

            self.tracing = Tracing(tracer_provider)
        self.cell = cell or SnapshotCell()
        self.pool = UpstreamPool(max_idle_per_endpoint=config.pool_max_idle,
                                 idle_timeout=config.pool_idle_timeout,
                                 connect_timeout=config.connect_timeout,
                                 ssl_context=make_ssl_context(config.upstream_ca),
                                 max_head_bytes=config.max_response_head_bytes)
        self.health = EndpointHealth(consecutive_failures=config.outlier_failures,
                                     base_ejection_s=config.outlier_ejection)
        self.budget = RetryBudget()
        self.admission = Admission(config.max_inflight)
        self.connections: set[ClientConnection] = set()
        self.listeners: list[Listener] = []
        self.draining = False
        self.source = None
        self.admin_runner = None
        self.admin_port = 0
        self._sweeper: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.started = time.time()

    def __repr__(self) -> str:
        return (f"<Runtime {self.config.mode} v{self.cell.version} listeners={len(self.listeners)} "
                f"connections={len(self.connections)} inflight={self.inflight}>")

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    # -- graph source ------------------------------------------------------------------------
    async def start_source(self) -> None:
        cfg = self.config
        if cfg.graph:
            src = FileSource(cfg.graph, self.cell)
            src.load_initial()
            src.start()
        else:
            from resolver.sources.redis_store import RedisStore
            from resolver.sources.redis_sync import RedisSource

            store = RedisStore(cfg.redis, prefix=cfg.redis_prefix)
            src = RedisSource(store, self.cell, cache_file=cfg.graph_cache,
                              regression_hold=cfg.regression_hold)
            await src.start()
        self.source = src

    # -- lifecycle ---------------------------------------------------------------------------
    async def start_listeners(self, listeners: list[tuple[Listener, str]]) -> None:
        from .admin import start_admin

        for listener, addr in listeners:
            host, port = _split(addr)
            await listener.start(host, port)
            self.listeners.append(listener)
        host, port = _split(self.config.admin)
        self.admin_runner, self.admin_port = await start_admin(self, host, port)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadline(now)
            self.pool.sweep()
            self.budget.rotate(now)

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        """SIGTERM: not ready at once, `Connection: close` on every next response, in-flight
        requests finish (up to drain_timeout), then stop."""
        if self.draining:
            return
        self.draining = True
        for listener in self.listeners:
            listener.draining = True
        log.info("draining: %d in flight, up to %ss", self.inflight, self.config.drain_timeout)
        deadline = time.monotonic() + self.config.drain_timeout
        for conn in list(self.connections):  # idle keep-alive connections can go now
            if conn.exchange is None and not conn.in_head and not conn.queue:
                conn.close()
            else:
                conn.close_after = True  # its next response says `Connection: close`
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
            listener.forwarder.deadlines.close()
        for conn in list(self.connections):
            conn.close()
        if self._sweeper:
            self._sweeper.cancel()
        if self.source is not None:
            await self.source.stop()
            store = getattr(self.source, "store", None)
            if store is not None:
                await store.close()
        self.pool.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        if self.own_tracer_provider is not None:
            # the spans of the last seconds are still in the batch: export them before exiting
            # (blocking, bounded by the exporter's timeout), so a rolling restart loses none
            await asyncio.to_thread(self.own_tracer_provider.shutdown)
            self.own_tracer_provider = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _split(addr: str) -> tuple[str, int]:
    from .config import split_host_port

    return split_host_port(addr)
