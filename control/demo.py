"""`stax demo`: demo services, a gateway and a sidecar pair, a graph with every resolution
kind, a tour of requests, and a table of where each one went. Needs nothing external; with
--redis URL the graph goes through Redis instead of a file."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile

import aiohttp
import orjson
import yaml
from aiohttp import web

from proxy.config import ProxyConfig
from proxy.main import start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_app(service: str, env: str, egress: int | None = None) -> tuple[web.AppRunner, int]:
    """A demo service. With an egress port it also calls `orders` through its sidecar,
    forwarding the context headers as OpenTelemetry instrumentation would."""

    async def handle(request: web.Request) -> web.Response:
        body = {"service": service, "instance_env": env,
                "request_env": request.headers.get("x-stax-env")}
        if egress is not None:
            fwd = {k: request.headers[k] for k in ("baggage", "traceparent", "x-stax-hops")
                   if k in request.headers}
            async with aiohttp.ClientSession() as s:
                async with s.get("http://orders/api", headers={**fwd, "Host": "orders"},
                                 proxy=f"http://127.0.0.1:{egress}") as r:
                    body["downstream"] = {"route": r.headers.get("x-stax-route"), "status": r.status}
        return web.json_response(body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


TOUR = [  # (what, env or None, Host)
    ("GET web", None, "web"),
    ("GET web", "team-a", "web"),
    ("GET web", "feature-1", "web"),
    ("GET orders", "feature-1", "orders"),
    ("GET payments", "feature-1", "payments"),
    ("GET auth", "feature-1", "auth"),
    ("GET web", "no-such-env", "web"),
    ("GET billing", "team-a", "billing"),
]


async def _tour(redis_url: str | None, keep: bool) -> int:
    runners = []
    proxies = []
    tmp = tempfile.mkdtemp(prefix="stax-demo-")
    try:
        web_f1_in, web_f1_out, orders_a_in = _free_port(), _free_port(), _free_port()
        apps = {}
        for service, env in (("web", "baseline"), ("orders", "baseline"), ("payments", "baseline"),
                             ("auth", "shared"), ("orders", "team-a")):
            runner, port = await _start_app(service, env)
            runners.append(runner)
            apps[(service, env)] = port
        runner, web_f1_app = await _start_app("web", "feature-1", egress=web_f1_out)
        runners.append(runner)

        def ep(port: int) -> dict:
            return {"endpoints": [f"127.0.0.1:{port}"]}

        graph = {
            "baseline": "baseline",
            "shared": {"auth": ep(apps[("auth", "shared")])},
            "envs": {
                "baseline": {"services": {"web": ep(apps[("web", "baseline")]),
                                          "orders": ep(apps[("orders", "baseline")]),
                                          "payments": ep(apps[("payments", "baseline")])},
                             "config": {"orders.timeout_ms": 5000, "orders.retries": 1}},
                "team-a": {"parent": "baseline", "services": {"orders": ep(orders_a_in)},
                           "config": {"orders.timeout_ms": 2000}},
                "feature-1": {"parent": "team-a", "services": {"web": ep(web_f1_in)}},
            },
        }
        source: dict = {}
        if redis_url:
            from resolver.sources.redis_store import RedisStore

            store = RedisStore(redis_url)
            try:
                version = await store.push(graph)
            finally:
                await store.close()
            source = {"redis": redis_url}
            where = f"Redis {redis_url} (graph v{version})"
        else:
            path = os.path.join(tmp, "graph.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(graph, f, sort_keys=False)
            source = {"graph": path}
            where = path

        def cfg(mode: str, **kw) -> ProxyConfig:
            return ProxyConfig(mode=mode, admin="127.0.0.1:0", **source, **kw)

        proxies.append(await start(cfg("sidecar", env="team-a", service="orders",
                                       app=f"127.0.0.1:{apps[('orders', 'team-a')]}",
                                       listen=f"127.0.0.1:{orders_a_in}", egress="127.0.0.1:0")))
        proxies.append(await start(cfg("sidecar", env="feature-1", service="web",
                                       app=f"127.0.0.1:{web_f1_app}", listen=f"127.0.0.1:{web_f1_in}",
                                       egress=f"127.0.0.1:{web_f1_out}")))
        gw = await start(cfg("gateway", listen="127.0.0.1:0"))
        proxies.append(gw)
        gw_port = gw.listeners[0].port

        print(f"stax demo — graph from {where}")
        print("  baseline (web, orders, payments) <- team-a (orders) <- feature-1 (web); auth is shared")
        print(f"  gateway on 127.0.0.1:{gw_port} (admin {gw.admin_port}); sidecars for web@feature-1 "
              f"and orders@team-a\n")
        rows = [("request", "env", "service", "kind", "provider", "status", "x-stax-route")]
        async with aiohttp.ClientSession() as s:
            for what, env, host in TOUR:
                headers = {"Host": host}
                if env:
                    headers["x-stax-env"] = env
                async with s.get(f"http://127.0.0.1:{gw_port}/", headers=headers) as r:
                    data = orjson.loads(await r.read())
                    route = r.headers.get("x-stax-route", "")
                    err = r.headers.get("x-stax-error")
                first = route.split(",")[0]
                kind, provider = _kind_provider(first)
                rows.append((what, env or "(none)", host, err or kind, provider, str(r.status), route))
                down = data.get("downstream") if isinstance(data, dict) else None
                if down:
                    k2, p2 = _kind_provider(down["route"].split(",")[0])
                    rows.append(("  └ web calls orders", env or "(none)", "orders", k2, p2,
                                 str(down["status"]), down["route"]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print("\nEvery resolution kind above came from one graph; ask why with "
              "`stax resolve --graph deploy/graph.example.yaml feature-1 orders`.")
        if keep:
            print(f"Try: curl -H 'Host: web' -H 'x-stax-env: feature-1' http://127.0.0.1:{gw_port}/")
        if keep:
            print("Running until Ctrl-C.")
            await asyncio.Event().wait()
        return 0
    finally:
        for rt in proxies:
            await rt.stop()
        for runner in runners:
            await runner.cleanup()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _kind_provider(entry: str) -> tuple[str, str]:
    if "=" not in entry:
        return "-", "-"
    where = entry.split("=", 1)[1].split("@", 1)[0]
    if where == "shared":
        return "shared", "(shared)"
    kind, _, provider = where.partition(":")
    return kind, provider


def run_demo(*, redis_url: str | None = None, keep: bool = False) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        import uvloop
        return uvloop.run(_tour(redis_url, keep))
    except KeyboardInterrupt:
        return 0
