"""Structured logs: one JSON object per line. A record whose msg is a dict is merged in."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, dict):
            out.update(record.msg)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


access_log = logging.getLogger("stax.access")


def log_access(listener: str, req, status: int, duration_s: float, endpoint=None) -> None:
    """One JSON line per request (--access-log): off by default, it costs on the hot path."""
    route = req.route
    access_log.info({
        "event": "request", "listener": listener, "method": req.method.decode("latin-1"),
        "path": req.path.decode("latin-1")[:512], "status": status,
        "duration_ms": round(duration_s * 1000, 3), "peer": req.peer, "env": req.env,
        "service": req.service, "kind": route.kind if route is not None else None,
        "provider_env": route.provider_env if route is not None else None,
        "endpoint": str(endpoint) if endpoint is not None else None,
        "trace_id": req.trace_id.decode() if req.trace_id else None,
    })
