"""Bodies stream both ways with backpressure (a real stax process, memory measured), and
pooled keep-alive connections behave."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from loadtests.common import free_port, memory_kb
from tests.servers import port_of, raw_upstream, read_response, running_gateway, write_graph

pytestmark = pytest.mark.asyncio
MB = 1 << 20


@pytest.fixture
async def stax_gateway(tmp_path, upstreams):
    (up,) = await upstreams("big")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"big": {"endpoints": [up.addr]}}}}})
    async with running_gateway(path) as (proc, port, _):
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "up": up}


async def test_200mb_each_way_with_slow_reader_bounded_memory(stax_gateway):
    pid = stax_gateway["proc"].pid
    base = memory_kb(pid)["VmRSS"]
    total = 200 * MB

    async def body():
        block = os.urandom(256 * 1024)
        sent = 0
        while sent < total:
            yield block
            sent += len(block)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(stax_gateway["url"] + "/sink", data=body(), headers={"Host": "big"}) as r:
            assert r.status == 200
            assert (await r.json())["size"] == total
        got = 0
        async with s.get(stax_gateway["url"] + f"/bytes?n={total}&chunked=1", headers={"Host": "big"}) as r:
            assert r.status == 200
            t0 = time.monotonic()
            async for chunk in r.content.iter_chunked(1 << 16):
                got += len(chunk)
                if time.monotonic() - t0 < 1.0:
                    await asyncio.sleep(0.01)  # a slow reader for the first second
        assert got == total
    peak = memory_kb(pid)["VmHWM"]
    assert (peak - base) < 50 * 1024, f"peak RSS grew {(peak - base) / 1024:.1f} MB"


async def test_content_length_body_both_ways(stax_gateway):
    data = os.urandom(3 * MB)
    async with aiohttp.ClientSession() as s:
        async with s.post(stax_gateway["url"] + "/sink", data=data, headers={"Host": "big"}) as r:
            assert (await r.json())["size"] == len(data)
        async with s.get(stax_gateway["url"] + f"/bytes?n={5 * MB}", headers={"Host": "big"}) as r:
            assert r.headers["content-length"] == str(5 * MB)
            assert len(await r.read()) == 5 * MB


async def _closing_upstream(state: dict):
    """Answers keep-alive, then closes each connection shortly after (as servers with a short
    idle timeout do)."""
    async def handle(reader, writer):
        state["conns"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"GET")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                state["served"] += 1
                await asyncio.sleep(0.05)
                writer.close()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_stale_pooled_connection_goes_out_fresh(tmp_path, proxies):
    state = {"conns": 0, "served": 0}
    server, port = await _closing_upstream(state)
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"svc": {"endpoints": [f"127.0.0.1:{port}"]}}}}})
    rt = await proxies("gateway", graph=path)
    url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(url, headers={"Host": "svc"}) as r:
                assert r.status == 200 and await r.read() == b"ok"
            await asyncio.sleep(0.2)  # the upstream closes the pooled connection meanwhile
    assert state["served"] == 3 and state["conns"] == 3
    assert rt.pool.idle_count == 0
    server.close()


async def test_keepalive_connections_are_reused(tmp_path, proxies, upstreams):
    (up,) = await upstreams("ka")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"ka": {"endpoints": [up.addr]}}}}})
    rt = await proxies("gateway", graph=path)
    url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(url, headers={"Host": "ka"}) as r:
                assert r.status == 200
    assert rt.pool.connects_total == 1
    assert "idle=1" in repr(rt.pool)


@pytest.mark.parametrize("size", [70_000, 900_000])  # in one read; in several
async def test_a_body_read_whole_before_the_upstream_connects_leaves_the_connection_reading(
        tmp_path, proxies, upstreams, size):
    # A body over the retry buffer pauses reading until the upstream connection is made; when
    # the rest of it was already in the same read, the request is complete at attach. The pause
    # must still end, or the connection's next request is never read.
    (up,) = await upstreams("sink")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"sink": {"endpoints": [up.addr]}}}}})
    rt = await proxies("gateway", graph=path)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    for i in range(3):
        writer.write(b"POST /sink HTTP/1.1\r\nHost: sink\r\nContent-Length: %d\r\n\r\n" % size
                     + b"b" * size)
        head, body = await read_response(reader)  # a hang fails here
        assert head.startswith(b"HTTP/1.1 200 "), (i, head)
        assert b'"size": %d,' % size in body
    writer.close()


async def test_a_failed_upstream_connect_after_a_big_body_leaves_the_connection_reading(tmp_path, proxies):
    # the same pause, when the connect fails instead: the error answers the request, and the
    # connection (kept alive: the body was read whole) must read the next one
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"gone": {"endpoints": [f"127.0.0.1:{free_port()}"]}}}}})
    rt = await proxies("gateway", graph=path)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    for i in range(2):
        writer.write(b"POST /x HTTP/1.1\r\nHost: gone\r\nContent-Length: 70000\r\n\r\n" + b"b" * 70000)
        head, _ = await read_response(reader)  # a hang fails here
        assert head.startswith(b"HTTP/1.1 502 ") and b"connection: close" not in head.lower(), (i, head)
    writer.close()


async def test_request_trailers_are_dropped_and_bounded(stax_gateway):
    """Trailer fields reach llhttp's header callback after the body: stax drops them (a small
    one changes nothing) and counts them against the 32 KiB head limit. Once they were kept,
    unbounded: 24 MB of trailers took a gateway from 43 to 979 MB."""
    port = int(stax_gateway["url"].rsplit(":", 1)[1])
    head = b"POST /sink HTTP/1.1\r\nHost: big\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"x-checksum: abc\r\n\r\n")
    resp, body = await read_response(reader)
    writer.close()
    assert resp.startswith(b"HTTP/1.1 200") and b'"size": 5' in body
    assert stax_gateway["up"].seen[-1]["size"] == 5

    pid = stax_gateway["proc"].pid
    base = memory_kb(pid)["VmRSS"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    block = (b"x-trailer-field: " + b"v" * 40 + b"\r\n") * 10_000
    try:
        for _ in range(400):  # 24 MB
            writer.write(block)
            await asyncio.wait_for(writer.drain(), 5)
    except (ConnectionError, TimeoutError):
        pass  # refused and closed before all of it was sent
    resp = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert resp.startswith(b"HTTP/1.1 431") and b"trailer fields over 32768 bytes" in resp, resp[:300]
    assert memory_kb(pid)["VmRSS"] - base < 20 * 1024


async def test_response_trailers_are_dropped_and_bounded(tmp_path, proxies):
    """An upstream's trailers are dropped too; past 64 KiB of them the response is cut off
    (the client never sees it complete) and the upstream connection is not reused."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
            try:
                if b"GET /endless" in head:
                    for _ in range(50):  # 3 MB of trailer fields
                        writer.write((b"x-t: " + b"v" * 55 + b"\r\n") * 1000)
                        await writer.drain()
                writer.write(b"x-sum: 1\r\n\r\n")
            except ConnectionError:
                return  # stax dropped it

    server, up = await raw_upstream(handle)
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"svc": {"endpoints": [up]}}}}})
    rt = await proxies("gateway", graph=path)
    port = port_of(rt, "gateway")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /small HTTP/1.1\r\nHost: svc\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == b"3\r\nabc\r\n0\r\n\r\n"  # dropped
    writer.write(b"GET /endless HTTP/1.1\r\nHost: svc\r\n\r\n")
    rest = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            rest += chunk
    except ConnectionError:
        pass
    writer.close()
    assert b"x-t" not in rest and not rest.endswith(b"0\r\n\r\n")  # cut off, never complete
    async with aiohttp.ClientSession() as s:  # the proxy goes on, on a new upstream connection
        async with s.get(f"http://127.0.0.1:{port}/small", headers={"Host": "svc"}) as r:
            assert r.status == 200 and await r.read() == b"abc"
    assert len(conns) == 2
    server.close()
