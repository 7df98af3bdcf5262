"""A real chain: client -> gateway -> sidecar ingress -> app -> sidecar egress -> sidecar
ingress -> app, with context carried by the apps the way OpenTelemetry would carry it."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.servers import free_port, port_of, raw_request, serve_app, write_graph

pytestmark = pytest.mark.asyncio


async def start_web_app(egress_port: int):
    """An app that calls `orders` through its sidecar's egress, forwarding baggage/traceparent."""
    async def handle(request: web.Request) -> web.Response:
        fwd = {k: request.headers[k] for k in ("baggage", "traceparent", "x-stax-hops")
               if k in request.headers}
        proxy = f"http://127.0.0.1:{egress_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get("http://orders/api/list", proxy=proxy, headers=fwd) as r:
                orders = await r.json()
                orders_route = r.headers.get("x-stax-route")
        return web.json_response({"web": "ok", "orders": orders, "orders_route": orders_route,
                                  "seen": dict(request.headers)})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return await serve_app(app)


@pytest.fixture
async def chain(tmp_path, upstreams, proxies):
    orders_app, auth = await upstreams("orders-app", "auth")
    web_in, web_out, orders_in = free_port(), free_port(), free_port()
    doc = {
        "baseline": "baseline",
        "shared": {"auth": {"endpoints": [auth.addr]}},
        "envs": {
            "baseline": {"services": {"web": {"endpoints": ["127.0.0.1:1"]},
                                      "orders": {"endpoints": ["127.0.0.1:1"]}}},
            "team-a": {"parent": "baseline", "services": {"orders": {"endpoints": [f"127.0.0.1:{orders_in}"]}}},
            "feature-1": {"parent": "team-a", "services": {"web": {"endpoints": [f"127.0.0.1:{web_in}"]}}},
        },
    }
    path = write_graph(tmp_path / "graph.yaml", doc)
    runner, web_port = await start_web_app(web_out)
    await proxies("sidecar", graph=path, env="team-a", service="orders", app=orders_app.addr,
                  listen=f"127.0.0.1:{orders_in}")
    web_sc = await proxies("sidecar", graph=path, env="feature-1", service="web",
                           app=f"127.0.0.1:{web_port}", listen=f"127.0.0.1:{web_in}",
                           egress=f"127.0.0.1:{web_out}")
    gw = await proxies("gateway", graph=path)
    async with aiohttp.ClientSession() as session:
        yield {"gw": port_of(gw, "gateway"), "orders_app": orders_app, "session": session,
               "egress": web_out, "web_sidecar": web_sc, "auth": auth}
    await runner.cleanup()


async def test_chain_carries_context_and_route(chain):
    trace = "0af7651916cd43dd8448eb211c80319c"
    async with chain["session"].get(
            f"http://127.0.0.1:{chain['gw']}/page", headers={
                "Host": "web", "x-stax-env": "feature-1",
                "traceparent": f"00-{trace}-b7ad6b7169203331-01", "baggage": "tenant=t1"}) as r:
        assert r.status == 200
        body = await r.json()
        # gateway entry first, then the ingress sidecar's
        assert r.headers["x-stax-route"] == "web=local:feature-1@v1,web=local:feature-1@v1"
    assert body["orders_route"] == "orders=ancestor:team-a@v1,orders=ancestor:team-a@v1"
    seen = chain["orders_app"].seen[-1]["headers"]
    assert seen["x-stax-env"] == "feature-1"
    assert "stax.env=feature-1" in seen["baggage"] and "tenant=t1" in seen["baggage"]
    assert seen["traceparent"].split("-")[1] == trace
    assert seen["x-stax-hops"] == "4"  # gateway, web ingress, web egress, orders ingress
    assert chain["orders_app"].seen[-1]["path"] == "/api/list"


async def test_egress_host_addressed_and_default_env(chain):
    # No context at all: the egress uses its sidecar's own env (feature-1).
    async with chain["session"].get(f"http://127.0.0.1:{chain['egress']}/x",
                                    headers={"Host": "orders"}) as r:
        assert r.status == 200
        assert r.headers["x-stax-route"].startswith("orders=ancestor:team-a@v1")
    assert chain["orders_app"].seen[-1]["headers"]["x-stax-env"] == "feature-1"


async def test_egress_shared_service(chain):
    async with chain["session"].get(f"http://127.0.0.1:{chain['egress']}/token",
                                    headers={"Host": "auth"}) as r:
        assert r.status == 200 and r.headers["x-stax-route"] == "auth=shared@v1"


async def test_egress_refuses_connect_and_unknown_hosts(chain):
    out = await raw_request(chain["egress"], b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and b"method_not_allowed" in out
    # a host that is not a service in the graph is never connected to
    for target, host in ((b"http://169.254.169.254/latest/meta-data", b"169.254.169.254"),
                         (b"http://example.com/", b"example.com"), (b"/", b"localhost:6379")):
        out = await raw_request(chain["egress"], b"GET " + target + b" HTTP/1.1\r\nHost: " + host +
                                b"\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 404") and b"no_provider" in out, out[:200]


async def test_ingress_refuses_env_outside_its_chain(chain, tmp_path):
    # the orders sidecar serves team-a; a request for env `baseline` must not be served by it
    rt = chain["web_sidecar"]
    port = port_of(rt, "ingress")
    async with chain["session"].get(f"http://127.0.0.1:{port}/", headers={"x-stax-env": "team-a"}) as r:
        assert r.status == 421
        assert r.headers["x-stax-error"] == "misdirected"
        assert orjson.loads(await r.read())["message"]


async def test_ingress_serves_an_env_named_like_any_word(tmp_path, upstreams, proxies):
    """An env may be called `v` (any valid name): the ingress route's memo must not mistake it
    for its own bookkeeping."""
    (app,) = await upstreams("web-app")
    path = write_graph(tmp_path / "graph.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"web": {"endpoints": ["127.0.0.1:1"]}}},
        "v": {"parent": "base", "services": {"web": {"endpoints": ["127.0.0.1:2"]}}}}})
    rt = await proxies("sidecar", graph=path, env="v", service="web", app=app.addr)
    port = port_of(rt, "ingress")
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the first answer and the memoized one
            async with session.get(f"http://127.0.0.1:{port}/", headers={"x-stax-env": "v"}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-stax-route"] == "web=local:v@v1"
