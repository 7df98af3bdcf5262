"""Timeouts, retries, the retry budget, outlier ejection, overload, WebSocket tunnels, TLS,
tracing across a chain, and graceful drain — each against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl

import aiohttp
import pytest
from aiohttp import web

from tests.servers import (
    eventually,
    free_port,
    gateway_process,
    port_of,
    raw_request,
    raw_upstream,
    serve_app,
    wait_ready,
    write_graph,
)

pytestmark = pytest.mark.asyncio


def graph(services: dict, config: dict | None = None) -> dict:
    return {"baseline": "base", "envs": {"base": {
        "services": {name: {"endpoints": eps} for name, eps in services.items()},
        "config": config or {}}}}


def dead_addr() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connect is refused


async def gateway(proxies, tmp_path, doc, **kw):
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc), **kw)
    return rt, f"http://127.0.0.1:{port_of(rt, 'gateway')}"


async def test_slow_upstream_gets_504_at_timeout(tmp_path, proxies, upstreams):
    (up,) = await upstreams("slow")
    rt, url = await gateway(proxies, tmp_path, graph({"svc": [up.addr]}, {"svc.timeout_ms": 300}))
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/slow?ms=3000", headers={"Host": "svc"}) as r:
            # a 504 proves the timeout answered: the upstream itself would have sent a 200
            assert r.status == 504 and r.headers["x-stax-error"] == "upstream_timeout"


async def test_short_timeout_fires_while_a_long_one_waits(tmp_path, proxies, upstreams):
    """Deadlines share one tick, sized for the shortest timeout waiting: a 300 ms timeout
    still answers while a 60 s one is pending. The upstream answers the short call after
    1.5 s, so a tick left at the 60 s timeout's size (3 s) would have let its 200 through."""
    (up,) = await upstreams("slow")
    doc = graph({"long": [up.addr], "short": [up.addr]},
                {"long.timeout_ms": 60000, "short.timeout_ms": 300, "short.retries": 0})
    rt, url = await gateway(proxies, tmp_path, doc)
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.get(url + "/slow?ms=2500", headers={"Host": "long"}))
        await asyncio.sleep(0.2)  # the 60 s deadline is waiting
        async with s.get(url + "/slow?ms=1500", headers={"Host": "short"}) as r:
            assert r.status == 504 and r.headers["x-stax-error"] == "upstream_timeout"
        async with await pending as r:
            assert r.status == 200  # the long one was left alone


async def test_retry_lands_on_healthy_endpoint(tmp_path, proxies, upstreams):
    (up,) = await upstreams("ok")
    rt, url = await gateway(proxies, tmp_path, graph({"svc": [dead_addr(), up.addr]}))
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 200 and r.headers["x-upstream"] == "ok"
    assert len(up.seen) == 6


async def test_a_retry_goes_out_on_a_new_connection(tmp_path, proxies):
    """An upstream that drops its idle keep-alive connections (a keep-alive timeout shorter
    than stax's pool's, Node's 5 s): a request that lands on one it is closing is retried on
    a fresh connection, not on the next pooled one, which is closing too."""
    answered = {"n": 0}

    async def one_per_connection(reader, writer):  # answers one request, closes at the next
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.1)  # so that the first two requests hold two connections
        answered["n"] += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server, up = await raw_upstream(one_per_connection)
    rt, _ = await gateway(proxies, tmp_path, graph({"svc": [up]}))
    port = port_of(rt, "gateway")
    get = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    first = await asyncio.gather(raw_request(port, get), raw_request(port, get))
    assert all(out.startswith(b"HTTP/1.1 200") for out in first) and rt.pool.idle_count == 2
    out = await raw_request(port, get)  # the pooled connections are both about to close
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert answered["n"] == 3
    server.close()


async def test_no_retry_of_post(tmp_path, proxies, upstreams):
    (up,) = await upstreams("ok")
    rt, url = await gateway(proxies, tmp_path, graph({"svc": [dead_addr(), up.addr]}))
    got = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # round-robin: one of the two goes to the dead endpoint
            async with s.post(url + "/", data=b"x", headers={"Host": "svc"}) as r:
                got.append((r.status, r.headers.get("x-stax-error")))
    assert sorted(got, key=str) == [(200, None), (502, "upstream_unavailable")], got
    assert len(up.seen) == 1  # the POST to the dead endpoint was not replayed on the other


async def test_retry_budget_caps_extra_attempts(tmp_path, proxies):
    attempts = {"n": 0}

    async def reset(reader, writer):  # accepts, then resets before any response byte
        attempts["n"] += 1
        writer.transport.abort()

    servers = [await asyncio.start_server(reset, "127.0.0.1", 0) for _ in range(2)]
    addrs = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    rt, url = await gateway(proxies, tmp_path, graph({"svc": addrs}, {"svc.retries": 3}),
                            outlier_failures=10_000)
    n = 60
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 502
    assert n < attempts["n"] <= n * 1.2 + 10  # some retries, never more than the budget (20%, floor 10)
    assert rt.budget.exhausted_total > 0
    for srv in servers:
        srv.close()


async def test_outlier_ejection_and_readmission(tmp_path, proxies, upstreams):
    a, b, c = await upstreams("a", "b", "c")
    rt, url = await gateway(proxies, tmp_path, graph({"svc": [a.addr, b.addr, c.addr]}),
                            outlier_ejection=1.0)
    port_c = c.port
    await c.stop()
    async with aiohttp.ClientSession() as s:
        for _ in range(30):  # retries hide the dead endpoint from clients
            async with s.get(url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 200
        assert rt.health.ejected_by_service() == {"svc": 1}
        admin = f"http://127.0.0.1:{rt.admin_port}/metrics"
        async with s.get(admin) as r:
            assert 'stax_endpoint_ejected{service="svc"} 1.0' in await r.text()
        await c.start(port_c)
        await asyncio.sleep(1.2)  # past the ejection period
        for _ in range(9):
            async with s.get(url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 200
    assert len(c.seen) > 0  # re-admitted
    assert rt.health.ejected_by_service() == {}


async def test_overload_answers_503_while_admitted_requests_succeed(tmp_path, proxies, upstreams):
    (up,) = await upstreams("slow")
    rt, url = await gateway(proxies, tmp_path, graph({"svc": [up.addr]}), max_inflight=2)
    async with aiohttp.ClientSession() as s:
        async def slow():
            async with s.get(url + "/slow?ms=800", headers={"Host": "svc"}) as r:
                return r.status

        admitted = [asyncio.ensure_future(slow()) for _ in range(2)]
        while rt.inflight < 2:
            await asyncio.sleep(0.01)
        async with s.get(url + "/", headers={"Host": "svc"}) as r:
            assert r.status == 503 and r.headers["x-stax-error"] == "overloaded"
        assert await asyncio.gather(*admitted) == [200, 200]


async def start_ws_echo():
    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    return await serve_app(app)


async def test_websocket_through_gateway_and_sidecar(tmp_path, proxies):
    runner, ws_port = await start_ws_echo()
    ingress = free_port()
    path = write_graph(tmp_path / "g.yaml", graph({"chat": [f"127.0.0.1:{ingress}"]}))
    await proxies("sidecar", graph=path, env="base", service="chat", app=f"127.0.0.1:{ws_port}",
                  listen=f"127.0.0.1:{ingress}")
    gw = await proxies("gateway", graph=path)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port_of(gw, 'gateway')}/ws",
                                headers={"Host": "chat"}) as ws:
            assert ws._response.headers["x-stax-route"] == "chat=local:base@v1,chat=local:base@v1"
            for i in range(3):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo:m{i}"
    await eventually(lambda: gw.inflight == 0, 1.0)
    assert gw.inflight == 0  # the tunnel's admission slot is released when it closes
    await runner.cleanup()


@pytest.mark.parametrize("delay_101", [0.0, 0.2])
async def test_a_tunnel_client_that_half_closes_before_the_101(tmp_path, proxies, delay_101):
    """Bytes sent after the Upgrade head and then the client's FIN, all before the upstream
    switches: the upstream gets the bytes, then the FIN, in that order (once the FIN went
    first: the bytes were lost and the upstream connection failed)."""
    got = []

    async def echo(reader, writer):  # switches (after a while), echoes until EOF, closes
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(delay_101)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        while data := await reader.read(65536):
            got.append(data)
            writer.write(data)
        writer.close()

    server, up = await raw_upstream(echo)
    rt, _ = await gateway(proxies, tmp_path, graph({"echo": [up]}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    early = os.urandom(5000)
    writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n" + early)
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 5)  # to the proxy's close
    writer.close()
    server.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert body == early and b"".join(got) == early
    await eventually(lambda: rt.inflight == 0, 1.0)
    assert rt.inflight == 0 and rt.pool.active == 0


async def test_an_upstream_half_close_in_a_tunnel_leaves_the_client_sending(tmp_path, proxies):
    """The upstream says its last word and half-closes: the client reads to EOF, then still
    sends, and the upstream gets it (once the upstream's FIN closed the whole tunnel). When
    the client half-closes too, the tunnel ends and its slot is released."""
    got = []

    async def says_bye_first(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\nbye")
        writer.write_eof()
        while data := await reader.read(65536):
            got.append(data)
        writer.close()

    server, up = await raw_upstream(says_bye_first)
    rt, _ = await gateway(proxies, tmp_path, graph({"raw": [up]}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    writer.write(b"GET / HTTP/1.1\r\nHost: raw\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n")
    out = await asyncio.wait_for(reader.read(), 5)  # to the upstream's FIN
    assert out.startswith(b"HTTP/1.1 101") and out.endswith(b"\r\n\r\nbye")
    writer.write(b"late words")
    writer.write_eof()
    await eventually(lambda: rt.inflight == 0, 2.0)
    writer.close()
    server.close()
    assert b"".join(got) == b"late words"
    assert rt.inflight == 0 and rt.pool.active == 0


async def test_bytes_ahead_of_a_slow_101_are_bounded(tmp_path, proxies):
    """A client streaming after its Upgrade head while the upstream has not switched yet:
    stax holds 64 KiB of it (about one read more), then stops reading until the 101, and
    then every byte goes through. Once it read on without a bound (1.4 GB in 4 s)."""
    switch = asyncio.Event()
    received = {"n": 0}
    total = 32 * 1024 * 1024

    async def slow_switch(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await switch.wait()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n")
        while data := await reader.read(1 << 20):
            received["n"] += len(data)
        writer.close()

    server, up = await raw_upstream(slow_switch)
    rt, _ = await gateway(proxies, tmp_path, graph({"raw": [up]}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    writer.write(b"GET / HTTP/1.1\r\nHost: raw\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n")

    async def stream():
        block = b"x" * (1 << 20)
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    sending = asyncio.ensure_future(stream())
    await asyncio.sleep(1.0)  # ample for 32 MB on loopback, were they read
    (conn,) = rt.connections
    held = sum(len(chunk) for chunk in conn.exchange.early)
    assert not sending.done() and held <= 64 * 1024 + 256 * 1024, held
    switch.set()
    await asyncio.wait_for(sending, 10)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
    await eventually(lambda: received["n"] == total, 4.0)
    assert received["n"] == total
    writer.close()
    server.close()


@pytest.fixture
def ca():
    trustme = pytest.importorskip("trustme", reason="trustme makes the test CA")
    return trustme.CA()


async def test_tls_upstream_and_tls_edge(tmp_path, proxies, ca):
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    up_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(up_ctx)

    async def hello(request):
        return web.Response(text=f"tls:{request.secure}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner, up_port = await serve_app(app, ssl_context=up_ctx)

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    rt, _ = await gateway(proxies, tmp_path, graph({"secure": [f"https://localhost:{up_port}"]}),
                          upstream_ca=str(ca_file), tls_cert=str(cert_file), tls_key=str(key_file))
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://localhost:{port_of(rt, 'gateway')}/", ssl=client_ctx,
                         headers={"Host": "secure"}) as r:
            assert r.status == 200 and await r.text() == "tls:True"
        # a client that does not trust the CA is refused at the edge
        with pytest.raises(aiohttp.ClientConnectorError):
            async with s.get(f"https://localhost:{port_of(rt, 'gateway')}/", headers={"Host": "secure"}):
                pass
    await runner.cleanup()


async def test_span_parentage_across_a_chain(tmp_path, proxies, upstreams):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (orders,) = await upstreams("orders")
    web_in, web_out = free_port(), free_port()

    async def web_app(request):  # forwards the context like OTel auto-instrumentation
        fwd = {k: request.headers[k] for k in ("baggage", "traceparent") if k in request.headers}
        async with aiohttp.ClientSession() as s:
            async with s.get("http://orders/", proxy=f"http://127.0.0.1:{web_out}", headers=fwd) as r:
                return web.Response(status=r.status)

    app = web.Application()
    app.router.add_get("/", web_app)
    runner, app_port = await serve_app(app)
    path = write_graph(tmp_path / "g.yaml", graph({"web": [f"127.0.0.1:{web_in}"], "orders": [orders.addr]}))
    await proxies("sidecar", graph=path, env="base", service="web", app=f"127.0.0.1:{app_port}",
                  listen=f"127.0.0.1:{web_in}", egress=f"127.0.0.1:{web_out}", tracer_provider=provider)
    gw = await proxies("gateway", graph=path, tracer_provider=provider)
    trace_id = "5b8efff798038103d269b633813fc60c"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port_of(gw, 'gateway')}/", headers={
                "Host": "web", "traceparent": f"00-{trace_id}-eee19b7ec3c1b174-01"}) as r:
            assert r.status == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) >= {"stax gateway", "stax ingress", "stax egress", "stax forward web", "stax forward orders"}
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {trace_id}
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}

    def parent(span):
        return by_id.get(span.parent.span_id) if span.parent else None

    gw_server = spans["stax gateway"]
    assert format(gw_server.parent.span_id, "016x") == "eee19b7ec3c1b174"
    ingress, egress = spans["stax ingress"], spans["stax egress"]
    assert parent(parent(ingress)) is gw_server  # gateway server -> gateway client -> ingress server
    assert parent(parent(egress)) is ingress  # ingress server -> ingress client -> (app) -> egress server
    orders_client = spans["stax forward orders"]
    assert parent(orders_client) is egress
    assert orders_client.attributes["stax.kind"] == "local" and orders_client.attributes["stax.retry"] == 0
    assert orders.seen[-1]["headers"]["traceparent"].split("-")[2] == format(orders_client.context.span_id, "016x")
    await runner.cleanup()


async def test_unsampled_requests_make_no_client_spans(tmp_path, proxies, upstreams):
    """The default sampler follows the caller: an unsampled traceparent stays unsampled, the
    trace id continues with a new span id for this hop, and nothing is exported."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (orders,) = await upstreams("orders")
    _, url = await gateway(proxies, tmp_path, graph({"orders": [orders.addr]}), tracer_provider=provider)
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with aiohttp.ClientSession() as s:
        for flags in ("00", "01"):
            async with s.get(f"{url}/", headers={"Host": "orders",
                                                 "traceparent": f"00-{trace_id}-{caller}-{flags}"}) as r:
                assert r.status == 200
    unsampled, sampled = (h["headers"]["traceparent"].split("-") for h in orders.seen[-2:])
    assert unsampled[1] == trace_id and unsampled[2] not in (caller, "0" * 16) and unsampled[3] == "00"
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["stax forward orders", "stax gateway"]  # the sampled one only
    client = next(s for s in spans if s.name == "stax forward orders")
    assert sampled[3] == "01" and sampled[2] == format(client.context.span_id, "016x")


async def test_sigterm_drains_in_flight_requests(tmp_path, upstreams):
    (up,) = await upstreams("slow")
    path = write_graph(tmp_path / "g.yaml", graph({"svc": [up.addr]}))
    proc, port, admin = gateway_process(path, "--drain-timeout", "10")
    try:
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as s:
            async def slow():
                async with s.get(f"http://127.0.0.1:{port}/slow?ms=1000", headers={"Host": "svc"}) as r:
                    return r.status, r.headers.get("connection", "").lower()

            flights = [asyncio.ensure_future(slow()) for _ in range(5)]
            while len(up.seen) < 5:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                assert r.status == 503 and (await r.json())["draining"] is True
            results = await asyncio.gather(*flights)
        assert results == [(200, "close")] * 5
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigterm_exports_the_spans_still_batched(tmp_path, upstreams):
    """Spans wait in the SDK's batch for up to its schedule; a drained proxy exports them
    before it exits instead of losing the last seconds of traces at every rolling restart."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otlp extra")
    from loadtests.bench.otlp_sink import make_app

    (up,) = await upstreams("svc")
    sink, sink_port = await serve_app(make_app())
    path = write_graph(tmp_path / "g.yaml", graph({"svc": [up.addr]}))
    proc, port, admin = gateway_process(path, env=dict(
        os.environ, OTEL_TRACES_EXPORTER="otlp", OTEL_BSP_SCHEDULE_DELAY="600000",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{sink_port}/stax"))
    try:
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(f"http://127.0.0.1:{port}/", headers={"Host": "svc"}) as r:
                    assert r.status == 200
            async with s.get(f"http://127.0.0.1:{sink_port}/counts") as r:
                assert await r.json() == {}  # all 20 spans still batched (10-minute schedule)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30) == 0
            async with s.get(f"http://127.0.0.1:{sink_port}/counts") as r:
                assert await r.json() == {"/stax": 20}  # a server and a client span per request
    finally:
        if proc.poll() is None:
            proc.kill()
        await sink.cleanup()


async def test_round_robin_and_weights(tmp_path, proxies, upstreams):
    a, b, c = await upstreams("a", "b", "c")
    doc = {"baseline": "base", "envs": {"base": {"services": {
        "rr": {"endpoints": [a.addr, b.addr]},
        "weighted": {"endpoints": [{"address": a.addr, "weight": 3}, {"address": c.addr, "weight": 1}]}}}}}
    rt, url = await gateway(proxies, tmp_path, doc)
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(url + "/", headers={"Host": "rr"}) as r:
                assert r.status == 200
        assert (len(a.seen), len(b.seen)) == (3, 3)
        for _ in range(8):
            async with s.get(url + "/", headers={"Host": "weighted"}) as r:
                assert r.status == 200
    assert (len(a.seen) - 3, len(c.seen)) == (6, 2)
