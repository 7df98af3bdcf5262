"""Bad input and hostile clients at a real gateway: a clear 4xx, nothing reaches an
upstream that should not, the proxy keeps serving."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import orjson
import pytest

from proxy.stages.policy import mint_token
from tests.servers import (
    port_of,
    raw_request,
    read_response,
    running_gateway,
    write_graph,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def edge(tmp_path, upstreams, proxies):
    web, other = await upstreams("web", "other")
    doc = {"baseline": "base", "envs": {
        "base": {"services": {"web": {"endpoints": [web.addr]}, "api": {"endpoints": [other.addr]}}},
        "team-a": {"parent": "base"},
        "secret": {"parent": "base", "private": True}}}
    path = write_graph(tmp_path / "g.yaml", doc)
    rt = await proxies("gateway", graph=path, route_prefix=["/api=api"], trusted_proxies=["10.0.0.9"])
    yield {"rt": rt, "port": port_of(rt, "gateway"), "web": web, "other": other, "path": path}


async def still_serves(edge) -> None:
    out = await raw_request(edge["port"], b"GET /ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:100]


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: web\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web\r\nBad\x01Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: web\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: web\r\nHost: api\r\n\r\n", 400),
    (b"GET /a%2fb HTTP/1.1\r\nHost: web\r\n\r\n", 400),
    (b"GET /a%5Cb HTTP/1.1\r\nHost: web\r\n\r\n", 400),
    # a coding besides chunked: forwarding the body re-framed would drop the gzip
    (b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # a Host that is there and names nothing is invalid, not missing (RFC 9112 3.2)
    (b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
])
async def test_malformed_requests(edge, raw, status):
    out = await raw_request(edge["port"], raw, read_timeout=2)
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:120]
    assert b"x-stax-error:" in out
    assert edge["web"].seen == []
    await still_serves(edge)


async def test_error_log_lines_stay_short_whatever_the_client_sends(edge, caplog):
    with caplog.at_level(logging.INFO, logger="stax.proxy"):
        out = await raw_request(edge["port"], b"GET /" + b"p" * 12000 + b" HTTP/1.1\r\nHost: " + b"h" * 12000 +
                                b"\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    errors = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "error"]
    assert errors and all(len(str(e)) < 1000 for e in errors), [len(str(e)) for e in errors]


@pytest.mark.parametrize("attack", [
    # CL.TE and TE.CL: both framings present
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    b"5c\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n0\r\n\r\n",
    # duplicate, differing Content-Length
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    # obfuscated Transfer-Encoding
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    # bad chunk size
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
])
async def test_request_smuggling_never_reaches_upstream_as_two_requests(edge, attack):
    out = await raw_request(edge["port"], attack, read_timeout=2)
    assert out.startswith(b"HTTP/1.1 400"), out[:120]
    await asyncio.sleep(0.1)
    assert not any(r["path"] == "/smuggled" for r in edge["web"].seen)
    await still_serves(edge)


async def test_pipelined_requests_are_answered_in_order(edge):
    out = await raw_request(edge["port"], b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\n"
                            b"GET /2 HTTP/1.1\r\nHost: api\r\n\r\n"
                            b"GET /3 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b'"path":"/1"') < out.index(b'"path":"/2"') < out.index(b'"path":"/3"')


async def test_pipelining_deeper_than_256_is_refused_after_the_first_are_answered(edge):
    """llhttp parses a whole read ahead, so 256 KiB of tiny pipelined requests once queued
    ~10,000 Request objects per connection (MBs each). stax queues 256 behind the one in
    flight: those 257 are answered in order, then 503 `overloaded`, then close."""
    out = await raw_request(edge["port"], b"".join(
        b"GET /%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(400)), read_timeout=5)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)  # bodies end without CRLF
    assert statuses == [b"200"] * 257 + [b"503"], statuses
    assert b"more than 256 pipelined requests waiting" in out and out.rstrip().endswith(b"}")
    assert [r["path"] for r in edge["web"].seen] == [f"/{i}" for i in range(257)]
    await still_serves(edge)


async def test_a_head_begun_in_the_same_read_as_a_body_is_not_counted_with_it(edge):
    """One read holding 40 KB of a body and the start of the next head: only the head's own
    bytes count against the 32 KiB head limit (once, the whole read did: a false 431)."""
    body = b"y" * 40000
    reader, writer = await asyncio.open_connection("127.0.0.1", edge["port"])
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
                     + b"GET /second HTTP/1.1\r\nHo")
        await writer.drain()
        await asyncio.sleep(0.2)  # the proxy reads the partial head before the rest
        writer.write(b"st: web\r\n\r\n")
        first, body1 = await read_response(reader)
        second, _ = await read_response(reader)
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200") and orjson.loads(body1)["size"] == 40000, first
    assert second.startswith(b"HTTP/1.1 200"), second


@pytest.mark.parametrize("second", [
    b"GET /2 HTTP/1.1\r\nHost: web\r\nx-big: " + b"b" * 40000 + b"\r\n\r\n",  # whole, too large
    b"GET /2 HTTP/1.1\r\nHost: web\r\nx-big: " + b"b" * 40000,  # still coming, already too large
])
async def test_a_pipelined_head_too_large_is_answered_after_the_request_before_it(edge, second):
    """The 431 waits for the response in flight: answering it at once would come first, and
    closing would lose the first request's response."""
    out = await raw_request(edge["port"], b"GET /slow?ms=300 HTTP/1.1\r\nHost: web\r\n\r\n" + second,
                            read_timeout=3)
    assert out.startswith(b"HTTP/1.1 200"), out[:120]
    assert out.count(b"HTTP/1.1 431") == 1 and out.index(b"HTTP/1.1 431") > out.index(b'"path":"/slow?ms=300"')
    await still_serves(edge)


async def test_pipelined_requests_keep_their_own_http_version(edge):
    # A body of unknown length goes back chunked to an HTTP/1.1 client and close-delimited to
    # an HTTP/1.0 one: each pipelined request must be answered by its own version, though
    # llhttp has parsed all three heads before the first response arrives.
    get = b"GET /bytes?n=5&chunked=1 HTTP/1.%d\r\nHost: web\r\n\r\n"
    out = await raw_request(edge["port"], get % 1 + get % 1 + get % 0)
    first, second, third = out.split(b"HTTP/1.1 200")[1:]
    for resp in (first, second):
        assert b"transfer-encoding: chunked" in resp and resp.endswith(b"5\r\nxxxxx\r\n0\r\n\r\n")
    assert b"transfer-encoding" not in third and b"connection: close" in third
    assert third.endswith(b"\r\n\r\nxxxxx")


@pytest.fixture
async def edge_process(tmp_path, upstreams):
    """A real gateway process (port, upstream): in-process, the test's own reads share the
    proxy's event loop, and the timing that makes a reset does not happen."""
    (web,) = await upstreams("web")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {"b": {"services": {"web": {"endpoints": [web.addr]}}}}})
    async with running_gateway(path) as (_, port, _):
        yield port, web


async def read_to_eof(port: int, *writes: bytes, pause: float = 0.0) -> bytes:
    """Everything the proxy sends until it closes; `pause` before the second write. Raises
    ConnectionResetError when the proxy resets instead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(writes[0])
        if pause:
            await asyncio.sleep(pause)
        for data in writes[1:]:
            writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("later", [False, True])
async def test_a_connection_closed_on_a_keep_alive_client_lingers(edge_process, later):
    """An HTTP/1.0 keep-alive client gets a body of unknown length until close, and requests
    it pipelines are not answered. Closing with them unread in the socket, or arriving after,
    sends a reset, which can destroy the body still in flight and makes a close-delimited
    body look broken (asyncio's reader raises). stax sends FIN and reads on until the client
    closes (lingering)."""
    port, web = edge_process
    first = b"GET /bytes?n=70000&chunked=1 HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n"
    # more than stax reads before it stops to answer the first
    more = [b"POST /next HTTP/1.1\r\nHost: web\r\nContent-Length: 1500\r\n\r\n" + b"p" * 1500] * 4
    for _ in range(10):
        out = await read_to_eof(port, first, *more, pause=0.2 if later else 0.0)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head and len(body) == 70000
    assert {r["path"] for r in web.seen} == {"/bytes?n=70000&chunked=1"}


async def test_a_refused_pipelined_head_closes_lingering(edge_process):
    """A 431 for a head still arriving, after the response before it: both reach the client,
    then FIN, though 100 KB of the refused head stay unread (a plain close would reset)."""
    port, web = edge_process
    for _ in range(10):
        out = await read_to_eof(port, b"GET /slow?ms=100 HTTP/1.1\r\nHost: web\r\n\r\n",
                                b"GET /2 HTTP/1.1\r\nHost: web\r\nx-big: " + b"b" * 40000, *[b"b" * 20000] * 5)
        assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1 431") == 1, out[:200]


async def test_http10_keep_alive_is_said_back(edge):
    """An HTTP/1.0 client keeps its connection only if the response says keep-alive
    (RFC 9112 C.2.2): forwarded responses and stax's own errors both say it."""
    ka = b"GET /%s HTTP/1.0\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", edge["port"])
    try:
        for path, host, status in ((b"a", b"web", b"200"), (b"b", b"nope", b"404"), (b"c", b"web", b"200")):
            writer.write(ka % (path, host))  # the same connection: it was kept
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 " + status) and b"\r\nconnection: keep-alive\r\n" in head, head
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()
    out = await raw_request(edge["port"], b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")  # no keep-alive asked
    assert b"connection: close" in out and b"keep-alive" not in out


async def test_path_normalized_before_prefix_routing(edge):
    # /web/../api/x must route as /api/x (to api), and the normalized path goes upstream
    out = await raw_request(edge["port"], b"GET /web/../api/x/./y HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"x-stax-route: api=local:base@v1" in out
    assert edge["other"].seen[-1]["path"] == "/api/x/y"
    out = await raw_request(edge["port"], b"GET /%2e%2e/%2E%2e/api HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert b"x-stax-route: api=local:base@v1" in out
    assert edge["other"].seen[-1]["path"] == "/api"


async def test_no_ssrf_via_absolute_form_or_host(edge):
    for target, host in ((b"http://127.0.0.1:6379/", b"web"), (b"http://169.254.169.254/latest", b"web"),
                         (b"http://user@web/", b"web"), (b"/", b"127.0.0.1:22"), (b"/", b"[::1]:80")):
        out = await raw_request(edge["port"], b"GET " + target + b" HTTP/1.1\r\nHost: " + host +
                                b"\r\nConnection: close\r\n\r\n", read_timeout=2)
        assert out.startswith(b"HTTP/1.1 404"), (target, host, out[:150])
    # absolute-form naming a real service routes to its provider, never to the named host:port
    out = await raw_request(edge["port"], b"GET http://web:6379/x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and edge["web"].seen[-1]["path"] == "/x"
    # the authority ends at "/", "?" or "#": an empty path with a query is "/?query"
    for target, path in ((b"http://web?q=1", "/?q=1"), (b"http://web:80?q=2", "/?q=2"), (b"http://web", "/")):
        out = await raw_request(edge["port"], b"GET " + target + b" HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200"), (target, out[:150])
        assert edge["web"].seen[-1]["path"] == path


async def test_internal_headers_stripped_and_forwarded_trust(edge):
    out = await raw_request(edge["port"], b"GET / HTTP/1.1\r\nHost: web\r\nx-stax-mirror: 1\r\n"
                            b"x-stax-route: evil\r\nx-stax-hops: 3\r\nx-forwarded-for: 6.6.6.6\r\n"
                            b"x-forwarded-proto: https\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    h = edge["web"].seen[-1]["headers"]
    assert "x-stax-mirror" not in h and "x-stax-route" not in h
    assert h["x-stax-hops"] == "4"  # never stripped or lowered
    assert h["x-forwarded-for"] == "127.0.0.1" and h["x-forwarded-proto"] == "http"


@pytest.mark.parametrize("trusted", [["127.0.0.1"], ["10.0.0.0/8", "127.0.0.0/8"]])
async def test_trusted_proxy_keeps_forwarded_headers(tmp_path, upstreams, proxies, trusted):
    (web,) = await upstreams("web")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {"b": {"services": {"web": {"endpoints": [web.addr]}}}}})
    rt = await proxies("gateway", graph=path, trusted_proxies=trusted)
    await raw_request(port_of(rt, "gateway"), b"GET / HTTP/1.1\r\nHost: web\r\nx-forwarded-for: 6.6.6.6\r\n"
                      b"x-forwarded-proto: https\r\nConnection: close\r\n\r\n")
    h = web.seen[-1]["headers"]
    assert h["x-forwarded-for"] == "6.6.6.6, 127.0.0.1" and h["x-forwarded-proto"] == "https"


async def test_private_env_needs_a_token(edge):
    out = await raw_request(edge["port"], b"GET / HTTP/1.1\r\nHost: web\r\nx-stax-env: secret\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403") and b"forbidden_context" in out
    assert edge["web"].seen == []


async def test_allow_list_policy(tmp_path, upstreams, proxies):
    (web,) = await upstreams("web")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {
        "b": {"services": {"web": {"endpoints": [web.addr]}}}, "ok": {"parent": "b"}, "no": {"parent": "b"}}})
    rt = await proxies("gateway", graph=path, context_policy="allow-list", context_allow=["ok"])
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
        for env, status in (("ok", 200), ("no", 403), (None, 200)):
            headers = {"Host": "web", **({"x-stax-env": env} if env else {})}
            async with s.get(url, headers=headers) as r:
                assert r.status == status, env


async def test_signed_policy(tmp_path, upstreams, proxies):
    (web,) = await upstreams("web")
    key_file = tmp_path / "key"
    key_file.write_bytes(b"k" * 32)
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {
        "b": {"services": {"web": {"endpoints": [web.addr]}}}, "team-a": {"parent": "b"},
        "secret": {"parent": "b", "private": True}}})
    rt = await proxies("gateway", graph=path, context_policy="signed", env_token_key=str(key_file))
    url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
    good = mint_token(b"k" * 32, "team-a", 60)
    cases = [
        ({"x-stax-env": "team-a"}, 403),
        ({"x-stax-env": "team-a", "x-stax-env-token": good}, 200),
        ({"x-stax-env": "team-a", "Cookie": f"stax-env-token={good}"}, 200),
        ({"x-stax-env": "secret", "x-stax-env-token": good}, 403),  # token for another env
        ({"x-stax-env": "team-a", "x-stax-env-token": mint_token(b"k" * 32, "team-a", -5)}, 403),
        ({"x-stax-env": "team-a", "x-stax-env-token": good[:-2] + "00"}, 403),
        ({"x-stax-env": "secret", "x-stax-env-token": mint_token(b"k" * 32, "secret", 60)}, 200),
        ({}, 200),  # the default env needs nothing
    ]
    async with aiohttp.ClientSession() as s:
        for headers, status in cases:
            async with s.get(url, headers={"Host": "web", **headers}) as r:
                assert r.status == status, (headers, await r.text())
    assert all("x-stax-env-token" not in r["headers"] for r in web.seen)  # never forwarded


async def test_slowloris_is_cut_off_and_others_keep_being_served(tmp_path, upstreams, proxies):
    (web,) = await upstreams("web")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {"b": {"services": {"web": {"endpoints": [web.addr]}}}}})
    rt = await proxies("gateway", graph=path, header_timeout=1.0)
    port = port_of(rt, "gateway")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    for ch in b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: " + b"a" * 40:
        writer.write(bytes([ch]))
        try:
            got = await asyncio.wait_for(reader.read(4096), 0.1)
        except TimeoutError:
            continue
        break
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got
    await still_serves({"port": port})
    writer.close()
    for _ in range(50):
        if len(rt.connections) == 0:
            break
        await asyncio.sleep(0.02)
    assert len(rt.connections) == 0


async def test_a_pipelined_head_timing_out_is_answered_after_the_request_before_it(
        tmp_path, upstreams, proxies):
    """The 408 of a pipelined head that stalls waits for the response in flight (once it was
    written at once, and closing lost that response)."""
    (web,) = await upstreams("web")
    path = write_graph(tmp_path / "g.yaml", {"baseline": "b", "envs": {"b": {"services": {"web": {"endpoints": [web.addr]}}}}})
    rt = await proxies("gateway", graph=path, header_timeout=0.5)
    out = await raw_request(port_of(rt, "gateway"), b"GET /slow?ms=2500 HTTP/1.1\r\nHost: web\r\n\r\n"
                            b"GET /2 HTTP/1.1\r\nHo", read_timeout=5)
    assert out.startswith(b"HTTP/1.1 200"), out[:120]
    assert out.count(b"HTTP/1.1 408") == 1 and out.index(b"HTTP/1.1 408") > out.index(b'"path":"/slow?ms=2500"')
    assert [r["path"] for r in web.seen] == ["/slow?ms=2500"]


async def test_a_request_refused_with_close_lingers_for_those_pipelined_behind_it(edge_process):
    """A 400 that closes (two Host headers: the framing is not to be trusted) with requests
    pipelined behind it: the 400 arrives, then FIN, never a reset."""
    port, web = edge_process
    more = [b"POST /next HTTP/1.1\r\nHost: web\r\nContent-Length: 1500\r\n\r\n" + b"p" * 1500] * 4
    for _ in range(10):
        out = await read_to_eof(port, b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n", *more)
        assert out.startswith(b"HTTP/1.1 400") and b"connection: close" in out, out[:200]
    assert web.seen == []
