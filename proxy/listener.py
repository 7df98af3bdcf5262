"""One listening port of a running proxy: its stage list, forwarder and metrics. Compiled
with the request path (setup.py's HOT_PATH): each request reads it several times."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from resolver.errors import StaxError

from .request import Request
from .server_protocol import ClientConnection
from .stages.forward import Forwarder
from .stats import Stats

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("stax.proxy")


class Listener:
    """One listening port: a stage list (top to bottom) and the terminal forwarder."""

    def __init__(self, rt: Runtime, name: str, stages: list, *, tls: ssl.SSLContext | None = None) -> None:
        self.rt = rt
        self.name = name
        self.stages = stages
        self.config = rt.config
        self.connections = rt.connections
        self.stats = Stats(name)
        self.tls = tls
        self.draining = False  # set with the runtime's: read on every request
        self.forwarder = Forwarder(rt.pool, rt.health, self.stats, rt.budget, mode=name,
                                   tracing=rt.tracing, access_log=rt.config.access_log)
        self.tracing = rt.tracing
        # Any, not asyncio.Server: uvloop's has a list of sockets where typeshed says a tuple,
        # and compiled code checks declared types
        self.server: Any = None
        self.admission = rt.admission

    def __repr__(self) -> str:
        return f"<Listener {self.name} stages={[s.__name__ for s in self.stages]}>"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        scheme = b"https" if self.tls else b"http"
        self.server = await loop.create_server(
            lambda: ClientConnection(self, scheme), host, port, ssl=self.tls, backlog=2048,
            reuse_address=True)

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError(f"listener {self.name} is not started")
        return self.server.sockets[0].getsockname()[1]

    # Around the stage list, not one of them: a release pairs with every admit.
    def admit(self) -> None:
        self.admission.admit()

    def release(self) -> None:
        self.admission.release()

    def log_error(self, req: Request | None, err: StaxError, peer: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info({
                "event": "error", "listener": self.name, "code": err.code, "status": err.status,
                "message": err.message, "peer": peer,
                "method": req.method.decode("latin-1") if req else None,
                "path": req.path.decode("latin-1")[:200] if req else None,
                "env": req.env if req else None,
                "service": req.service[:200] if req and req.service else None,  # from Host: any text
            })

    def log_exception(self, what: str, exc: BaseException) -> None:
        log.exception("%s: %s", what, exc, exc_info=exc)
