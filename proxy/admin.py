"""Admin port (aiohttp, off the hot path): /healthz, /readyz, /metrics, /debug/graph,
/debug/resolve."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from resolver.errors import StaxError

from .metrics import make_registry


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


def make_admin_app(rt) -> web.Application:
    registry = make_registry(rt)

    async def healthz(request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        cell = rt.cell
        ready = cell.current is not None and not rt.draining
        body = {
            "ready": ready,
            "graph_version": cell.version,
            "graph_age_s": round(cell.age_s, 3),
            "source_connected": cell.source_connected,
            "draining": rt.draining,
            "regression": cell.regression,
            "last_error": cell.last_error or None,
        }
        return _json(body, 200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def debug_graph(request: web.Request) -> web.Response:
        snap = rt.cell.current
        if snap is None:
            return _json({"error": "no_graph", "message": "no graph loaded yet"}, 503)
        return _json(snap.graph.to_doc())

    async def debug_resolve(request: web.Request) -> web.Response:
        env, service = request.query.get("env"), request.query.get("service")
        if not env or not service:
            return _json({"error": "bad_request", "message": "give ?env=ENV&service=SERVICE"}, 400)
        snap = rt.cell.current
        if snap is None:
            return _json({"error": "no_graph", "message": "no graph loaded yet"}, 503)
        try:
            return _json(snap.explain(env, service))
        except StaxError as err:
            return _json({"error": err.code, "message": err.message}, err.status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/graph", debug_graph)
    app.router.add_get("/debug/resolve", debug_resolve)
    return app


async def start_admin(rt, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_admin_app(rt), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
