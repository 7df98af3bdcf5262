"""The reference for what a framework-level proxy costs: an aiohttp web server forwarding
every request to one upstream through one ClientSession (keep-alive pool, no limit),
streaming the response back. No routing, no context, no metrics.

    python -m loadtests.naive_aiohttp_proxy --listen 127.0.0.1:8081 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
              "proxy-connection", "proxy-authenticate", "proxy-authorization", "content-length"}


def make_app(upstream: str) -> web.Application:
    base = f"http://{upstream}"
    app = web.Application()

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        data = request.content if request.body_exists else None
        async with app["session"].request(request.method, base + request.path_qs, headers=headers,
                                          data=data, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(listen: str, upstream: str) -> None:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port), backlog=2048).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8081")
    ap.add_argument("--upstream", required=True, help="host:port")
    args = ap.parse_args()
    try:
        uvloop.run(serve(args.listen, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
