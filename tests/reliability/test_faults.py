"""Faults, measured: broken upstreams, clients that vanish at each stage, Redis killed under
load. Each test states the outcome it proves."""

from __future__ import annotations

import asyncio
import os
import resource

import aiohttp
import pytest

from resolver.sources.redis_store import RedisStore
from tests.servers import gateway_process, port_of, raw_request, wait_ready, write_graph

pytestmark = pytest.mark.asyncio


async def raw_upstream(script: bytes, *, close: str = "close"):
    """A TCP upstream that reads a request head, writes `script`, then closes or resets."""
    state = {"conns": 0}

    async def handle(reader, writer):
        state["conns"] += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(script)
        await writer.drain()
        if close == "reset":
            writer.transport.abort()
        elif close == "close":
            writer.close()
        else:  # stall
            await asyncio.sleep(30)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", state


async def gw_for(proxies, tmp_path, addr: str, **config):
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [addr]}},
                                           "config": config}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc))
    return rt, f"http://127.0.0.1:{port_of(rt, 'gateway')}/"


@pytest.mark.parametrize("garbage", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",  # invalid framing
    b"HTTP/1.1 2000 Weird\r\n\r\n",
])
async def test_garbage_response_is_502_bad_response(tmp_path, proxies, garbage):
    server, addr, _ = await raw_upstream(garbage)
    rt, url = await gw_for(proxies, tmp_path, addr, **{"svc.retries": 0})
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Host": "svc"}) as r:
            assert r.status == 502 and r.headers["x-stax-error"] == "upstream_bad_response"
    assert rt.pool.idle_count == 0  # that connection is never reused
    server.close()


async def test_bytes_after_a_response_never_reach_the_next_request(tmp_path, proxies):
    """An upstream that writes more than its response (here on a kept-alive connection) puts
    that connection out of sync. A pipelined request started as that response completes must
    not go out on it: it gets its own connection and its answer, not a timeout."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    rt, _ = await gw_for(proxies, tmp_path, addr, **{"svc.timeout_ms": 30000, "svc.retries": 0})
    get = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"
    out = await raw_request(port_of(rt, "gateway"), get + get + get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert out.count(b"HTTP/1.1 200 OK") == 3, out
    assert len(conns) == 3  # each out-of-sync connection was dropped, never reused
    await settle(rt)
    assert rt.pool.active == 0 and rt.pool.idle_count == 0
    server.close()


async def test_an_endless_response_head_is_cut_off(tmp_path, proxies):
    """llhttp keeps a head until it completes: past --max-response-head-bytes (64 KiB) the
    upstream's response is refused, rather than held in memory until the timeout."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(300))
    server, addr, _ = await raw_upstream(head, close="stall")
    rt, url = await gw_for(proxies, tmp_path, addr, **{"svc.retries": 0, "svc.timeout_ms": 60000})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.get(url, headers={"Host": "svc"}) as r:
            body = await r.json()
            assert r.status == 502 and body["error"] == "upstream_bad_response"
            assert "response head over 65536 bytes" in body["message"]
    assert rt.pool.idle_count == 0
    server.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_unasked_101_never_reaches_the_client(tmp_path, proxies, method):
    """A 101 to a request that asked no Upgrade is a bad response: refused before its head
    is written (the client got the 101, then a reset), retried like one, and the connection
    is dropped once (the pool's count of active connections stays true)."""
    server, addr, state = await raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nrest", close="stall")
    rt, _ = await gw_for(proxies, tmp_path, addr, **{"svc.retries": 1})
    out = await raw_request(port_of(rt, "gateway"), f"{method} / HTTP/1.1\r\nHost: svc\r\n\r\n".encode(), read_timeout=3)
    assert out.startswith(b"HTTP/1.1 502") and b"x-stax-error: upstream_bad_response" in out, out
    assert method == "HEAD" or b"upstream switched protocols unasked" in out
    assert state["conns"] == 2  # the retry, on a new connection
    await settle(rt)
    assert rt.pool.active == 0 and rt.pool.idle_count == 0
    server.close()


async def test_response_hop_by_hop_headers_are_dropped(tmp_path, proxies):
    """Hop-by-hop response headers, and the ones the upstream's Connection names, never reach
    the client; end-to-end ones arrive unchanged, in order, with stax's x-stax-route."""
    server, addr, _ = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nX-First: 1\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: hidden\r\nKeep-Alive: timeout=5\r\nx-stax-route: theirs=local:x@v9\r\n"
        b"X-Last: 2\r\nContent-Length: 2\r\n\r\nok")
    rt, url = await gw_for(proxies, tmp_path, addr)
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Host": "svc"}) as r:
            assert r.status == 200 and await r.read() == b"ok"
            names = [k.lower() for k in r.headers]
            assert "x-secret" not in names and "keep-alive" not in names
            assert names.index("x-first") < names.index("x-last")
            assert r.headers["x-stax-route"] == "svc=local:b@v1,theirs=local:x@v9"
    server.close()


@pytest.mark.parametrize("response,expect,absent", [
    # a coding besides chunked stays on the body's Transfer-Encoding, chunked last
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     b"\r\ntransfer-encoding: gzip, chunked\r\n", b"content-length"),
    # without chunked last the body runs to the upstream's close: re-chunked, and complete
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
     b"\r\ntransfer-encoding: gzip, chunked\r\n", b"content-length"),
    # a 204 never carries Content-Length, whatever the upstream says
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
     b"HTTP/1.1 204 No Content\r\n", b"content-length"),
])
async def test_response_framing_keeps_its_meaning(tmp_path, proxies, response, expect, absent):
    server, addr, _ = await raw_upstream(response)
    rt, _ = await gw_for(proxies, tmp_path, addr)
    out = await raw_request(port_of(rt, "gateway"), b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    assert expect in out and absent not in out.lower(), out
    if out.startswith(b"HTTP/1.1 200"):
        assert out.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), out  # the body, whole
    server.close()


async def test_short_body_aborts_the_client(tmp_path, proxies):
    server, addr, state = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-ten!!", close="reset")
    rt, url = await gw_for(proxies, tmp_path, addr)
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Host": "svc"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # a short body never looks complete
                await r.read()
        assert rt.pool.idle_count == 0 and rt.pool.active == 0
    server.close()


async def test_reset_before_response_is_502_unavailable(tmp_path, proxies):
    server, addr, state = await raw_upstream(b"", close="reset")
    rt, url = await gw_for(proxies, tmp_path, addr)
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Host": "svc"}) as r:
            assert r.status == 502 and r.headers["x-stax-error"] == "upstream_unavailable"
    assert state["conns"] == 2  # one retry (GET), then the error
    server.close()


async def test_out_of_file_descriptors_is_503_and_ejects_no_endpoint(tmp_path, upstreams):
    """A proxy at its open-file limit cannot connect upstream. That is its own state, not the
    endpoints': 503 overloaded, no retry, no ejection, and it serves again once files free."""
    a, b = await upstreams("a", "b")
    graph = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {
        "b": {"services": {"svc": {"endpoints": [a.addr, b.addr]}}}}})

    def low_fd_limit():  # a hard limit: the proxy cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc, port, admin = gateway_process(graph, preexec=low_fd_limit)
    try:
        await wait_ready(admin, proc)
        held = []
        for _ in range(90):  # more client connections than the proxy has descriptors for
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.3)
        statuses = []
        for reader, writer in held:
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                statuses.append(head.split(b"\r\n")[0] + (b" overloaded" if b"x-stax-error: overloaded" in head else b""))
            except (asyncio.IncompleteReadError, ConnectionError):
                statuses.append(b"closed")  # one the proxy could not accept
        for _, writer in held:
            writer.transport.abort()
        assert b"HTTP/1.1 503 Service Unavailable overloaded" in statuses, statuses
        assert not any(s.startswith(b"HTTP/1.1 502") for s in statuses), statuses
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s:
            for _ in range(4):  # both endpoints serve again: neither was ejected
                async with s.get(f"http://127.0.0.1:{port}/", headers={"Host": "svc"}) as r:
                    assert r.status == 200
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics = await r.text()
        assert 'stax_endpoint_ejected{service="svc"} 1' not in metrics
        assert a.seen and b.seen
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path, upstreams):
    (a,) = await upstreams("a")
    graph = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [a.addr]}}}}})
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    proc, port, admin = gateway_process(graph, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    try:
        await wait_ready(admin, proc)
        with open(f"/proc/{proc.pid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
        assert int(soft) == want
    finally:
        proc.terminate()
        proc.wait(10)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(rt) -> None:
    for _ in range(100):
        if rt.inflight == 0 and rt.pool.active == 0 and not rt.connections:
            return
        await asyncio.sleep(0.02)


async def test_client_disconnects_at_each_stage_leak_nothing(tmp_path, proxies, upstreams):
    (up,) = await upstreams("up")
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [up.addr]}}}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc))
    port = port_of(rt, "gateway")
    await asyncio.sleep(0.05)
    fds = open_fds()
    tasks = len(asyncio.all_tasks())

    async def vanish(data: bytes, *, read: int = 0, wait: float = 0.2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            if read:
                await reader.read(read)
            await asyncio.sleep(wait)
        except ConnectionError:
            pass  # the proxy may already have given up on this client: that is fine too
        writer.transport.abort()

    for _ in range(5):
        # while waiting for the upstream's response head
        await vanish(b"GET /slow?ms=500 HTTP/1.1\r\nHost: svc\r\n\r\n")
        # while the request body streams
        await vanish(b"POST /sink HTTP/1.1\r\nHost: svc\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 200000)
        # while the response streams
        await vanish(b"GET /bytes?n=50000000 HTTP/1.1\r\nHost: svc\r\n\r\n", read=65536, wait=0.05)
    await settle(rt)
    await asyncio.sleep(0.6)  # let the upstream finish the slow handlers it was given
    assert rt.inflight == 0 and rt.pool.active == 0 and not rt.connections
    assert open_fds() <= fds + 2  # idle pooled upstream connections at most
    assert len(asyncio.all_tasks()) <= tasks + 1
    async with aiohttp.ClientSession() as s:  # and it still serves
        async with s.get(f"http://127.0.0.1:{port}/", headers={"Host": "svc"}) as r:
            assert r.status == 200


async def test_redis_killed_and_restarted_under_load(redis_server, upstreams, proxies, tmp_path):
    """Zero failed proxied requests while Redis dies; staleness shows; resync after restart."""
    a, b = await upstreams("a", "b")

    def doc(addr):
        return {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [addr]}}}}}

    store = RedisStore(redis_server.url)
    await store.push(doc(a.addr))
    rt = await proxies("gateway", redis=redis_server.url, graph_cache=str(tmp_path / "cache.json"))
    url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
    results: list[int] = []
    stop = asyncio.Event()

    async def load():
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.get(url, headers={"Host": "svc"}) as r:
                    results.append(r.status)
                await asyncio.sleep(0.005)

    task = asyncio.ensure_future(load())
    await asyncio.sleep(0.3)
    redis_server.stop()
    for _ in range(100):
        if not rt.cell.source_connected:
            break
        await asyncio.sleep(0.05)
    assert rt.cell.source_connected is False
    await asyncio.sleep(1.5)
    assert rt.cell.age_s > 1.0 and rt.cell.version == 1  # stale, still serving v1
    admin = f"http://127.0.0.1:{rt.admin_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["source_connected"] is False and body["graph_age_s"] > 1
    redis_server.start()
    await store.close()
    store = RedisStore(redis_server.url)
    await store.push(doc(b.addr))  # a fresh Redis: the new graph is v1 of a new epoch
    for _ in range(200):
        if rt.cell.source_connected and any(x["upstream"] == "b" for x in b.seen):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    await store.close()
    assert results and all(s == 200 for s in results), sorted(set(results))
    assert rt.cell.source_connected and len(b.seen) > 0
