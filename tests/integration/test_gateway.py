"""End to end through a real gateway: resolution kinds, context headers, errors, metrics."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import pytest

from tests.servers import port_of, raw_request, write_graph

pytestmark = pytest.mark.asyncio


def demo_graph(up: dict, **extra) -> dict:
    return {
        "baseline": "baseline",
        "shared": {"auth": {"endpoints": [up["auth"].addr]}},
        "envs": {
            "baseline": {
                "services": {"web": {"endpoints": [up["web-base"].addr]},
                             "orders": {"endpoints": [up["orders-base"].addr]}},
                "config": {"orders.timeout_ms": 5000},
            },
            "team-a": {"parent": "baseline",
                       "services": {"orders": {"endpoints": [up["orders-a"].addr]}},
                       "config": {"orders.timeout_ms": 300, "orders.retries": 0}},
            "feature-1": {"parent": "team-a",
                          "services": {"web": {"endpoints": [up["web-f1"].addr]}}},
            **extra,
        },
    }


@pytest.fixture
async def gw(tmp_path, upstreams, proxies):
    names = ["auth", "web-base", "orders-base", "orders-a", "web-f1"]
    up = dict(zip(names, await upstreams(*names), strict=True))
    path = write_graph(tmp_path / "graph.yaml", demo_graph(up))
    rt = await proxies("gateway", graph=path, route_prefix=["/api/orders=orders"])
    port = port_of(rt, "gateway")
    async with aiohttp.ClientSession() as session:
        yield {"rt": rt, "port": port, "up": up, "path": path, "session": session,
               "url": f"http://127.0.0.1:{port}"}


async def get(gw, path="/", **headers):
    async with gw["session"].get(gw["url"] + path, headers=headers) as resp:
        body = await resp.read()
        return resp, body


@pytest.mark.parametrize("env,service,upstream,route", [
    ("feature-1", "web", "web-f1", "web=local:feature-1@v1"),
    ("feature-1", "orders", "orders-a", "orders=ancestor:team-a@v1"),
    ("team-a", "web", "web-base", "web=baseline:baseline@v1"),
    ("baseline", "orders", "orders-base", "orders=local:baseline@v1"),
    ("feature-1", "auth", "auth", "auth=shared@v1"),
])
async def test_every_resolution_kind(gw, env, service, upstream, route):
    resp, body = await get(gw, "/x?q=1", Host=f"{service}.example.internal:8080", **{"x-stax-env": env})
    assert resp.status == 200
    assert resp.headers["x-upstream"] == upstream
    assert resp.headers["x-stax-route"] == route
    seen = gw["up"][upstream].seen[-1]
    assert seen["path"] == "/x?q=1"
    assert seen["headers"]["host"] == f"{service}.example.internal:8080"  # Host goes upstream unchanged


async def test_context_headers_upstream_sees(gw):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp, _ = await get(
        gw, "/", Host="web", baggage="userId=alice, stax.env=feature-1;prop=1,isProduction=false",
        traceparent=f"00-{trace}-00f067aa0ba902b7-01", **{"x-forwarded-for": "10.9.9.9"})
    assert resp.status == 200
    h = gw["up"]["web-f1"].seen[-1]["headers"]
    assert h["x-stax-env"] == "feature-1"
    members = [m.strip() for m in h["baggage"].split(",")]
    assert "stax.env=feature-1" in members and "userId=alice" in members and "isProduction=false" in members
    assert len([m for m in members if m.startswith("stax.env")]) == 1
    version, trace_id, span_id, flags = h["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", trace, "01")
    assert span_id != "00f067aa0ba902b7" and len(span_id) == 16
    assert h["x-stax-hops"] == "1"
    assert h["x-forwarded-for"] == "127.0.0.1"  # the client is not a trusted proxy: its XFF is dropped
    assert h["x-forwarded-proto"] == "http"


async def test_a_plain_baggage_value_goes_upstream_as_received(gw):
    # its one stax.env member reads stax.env=<name>: nothing to rewrite, order and spaces kept
    sent = "userId=alice, stax.env=feature-1 ,isProduction=false"
    for _ in range(2):  # parsed, then remembered
        resp, _ = await get(gw, "/", Host="web", baggage=sent)
        assert resp.status == 200
        h = gw["up"]["web-f1"].seen[-1]["headers"]
        assert h["baggage"] == sent and h["x-stax-env"] == "feature-1"
    # percent-encoded: rewritten, so the next hop reads the name it would decode
    resp, _ = await get(gw, "/", Host="web", baggage="userId=alice,stax.env=feature%2D1")
    h = gw["up"]["web-f1"].seen[-1]["headers"]
    assert h["baggage"] == "userId=alice,stax.env=feature-1" and h["x-stax-env"] == "feature-1"


async def test_new_trace_when_none_or_invalid(gw):
    await get(gw, "/", Host="web", traceparent="garbage")
    tp = gw["up"]["web-base"].seen[-1]["headers"]["traceparent"]
    assert len(tp.split("-")[1]) == 32 and tp.split("-")[1] != "0" * 32


async def test_two_different_traceparents_start_a_new_trace(gw):
    # as the W3C trace-context test suite asks (test_traceparent_duplicated): neither is believed
    sent = [b"00-12345678901234567890123456789011-1234567890123456-01",
            b"00-12345678901234567890123456789012-1234567890123456-01"]
    out = await raw_request(gw["port"], b"GET /dup HTTP/1.1\r\nHost: web\r\nConnection: close\r\n"
                            + b"".join(b"traceparent: %b\r\n" % tp for tp in sent) + b"\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    _, trace_id, _, _ = gw["up"]["web-base"].seen[-1]["headers"]["traceparent"].split("-")
    assert trace_id.encode() not in (tp.split(b"-")[1] for tp in sent) and len(trace_id) == 32
    # the same one twice is one context
    out = await raw_request(gw["port"], b"GET /dup HTTP/1.1\r\nHost: web\r\nConnection: close\r\n"
                            + b"traceparent: %b\r\n" % sent[0] * 2 + b"\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert gw["up"]["web-base"].seen[-1]["headers"]["traceparent"].split("-")[1] == sent[0].split(b"-")[1].decode()


async def test_hop_by_hop_headers_not_forwarded(gw):
    await get(gw, "/", Host="web", Connection="keep-alive, x-private", **{
        "x-private": "secret", "Keep-Alive": "timeout=5", "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9v", "x-custom": "kept", "x-stax-internal": "forged"})
    h = gw["up"]["web-base"].seen[-1]["headers"]
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "x-stax-internal"):
        assert name not in h, name
    assert h["x-custom"] == "kept"
    # a client naming Host in Connection cannot make stax send a head without one
    out = await raw_request(gw["port"], b"GET /named HTTP/1.1\r\nHost: web\r\nx-private: s\r\n"
                                        b"Connection: close, host, x-private\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    seen = gw["up"]["web-base"].seen[-1]
    assert seen["path"] == "/named" and seen["headers"]["host"] == "web" and "x-private" not in seen["headers"]


async def test_repeated_headers_and_methods_preserved(gw):
    session = gw["session"]
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        async with session.request(method, gw["url"] + "/m", data=b"payload",
                                   headers=[("Host", "web"), ("x-multi", "a"), ("x-multi", "b")]) as resp:
            assert resp.status == 200
        seen = gw["up"]["web-base"].seen[-1]
        assert seen["method"] == method
        assert [v for k, v in seen["header_list"] if k.lower() == "x-multi"] == ["a", "b"]
        assert seen["body"] == "payload"


async def test_route_prefix_longest_match(gw):
    resp, _ = await get(gw, "/api/orders/42", Host="web")
    assert resp.headers["x-stax-route"] == "orders=local:baseline@v1"
    assert gw["up"]["orders-base"].seen[-1]["path"] == "/api/orders/42"


async def test_env_from_cookie_when_no_header(gw):
    resp, _ = await get(gw, "/", Host="web", Cookie="a=b; stax-env=feature-1")
    assert resp.headers["x-stax-route"] == "web=local:feature-1@v1"


async def test_head_and_204(gw):
    async with gw["session"].head(gw["url"] + "/bytes?n=5000", headers={"Host": "web"}) as resp:
        assert resp.status == 200
        assert resp.headers["content-length"] == "5000"
        assert await resp.read() == b""
    resp, body = await get(gw, "/status/204", Host="web")
    assert resp.status == 204 and body == b""
    # the connection is still usable after both
    resp, body = await get(gw, "/", Host="web")
    assert resp.status == 200


async def test_upstream_errors_pass_through_untouched(gw):
    resp, body = await get(gw, "/status/503", Host="web")
    assert resp.status == 503 and body == b"status"
    assert "x-stax-error" not in resp.headers
    assert resp.headers["x-stax-route"] == "web=local:baseline@v1"


@pytest.mark.parametrize("headers,status,code", [
    ({"Host": "web", "x-stax-env": "Bad_Name"}, 400, "bad_context"),
    ({"Host": "web", "x-stax-env": "team-a", "baggage": "stax.env=feature-1"}, 400, "bad_context"),
    ({"Host": "web", "x-stax-hops": "many"}, 400, "bad_context"),
    ({"Host": "web", "x-stax-hops": "32"}, 508, "loop_detected"),
    ({"Host": "web", "x-stax-env": "nowhere"}, 404, "unknown_env"),
    ({"Host": "nosuchservice"}, 404, "no_provider"),
    ({"Host": "web", "baggage": ",".join(f"k{i}=v" for i in range(70))}, 431, "headers_too_large"),
])
async def test_error_codes(gw, headers, status, code):
    resp, body = await get(gw, "/", **headers)
    assert resp.status == status
    assert resp.headers["x-stax-error"] == code
    err = resp.headers and __import__("json").loads(body)
    assert err["error"] == code and err["message"]
    assert "x-stax-route" not in resp.headers  # raised before resolution


async def test_no_route_without_host(gw):
    out = await raw_request(gw["port"], b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    assert b"x-stax-error: no_route" in out


async def test_malformed_request_is_400(gw):
    out = await raw_request(gw["port"], b"GET / HTTP/1.1\r\nHost: web\r\nBad Header\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"x-stax-error: bad_request" in out
    # an h2c client with prior knowledge learns why, in words rather than llhttp's
    out = await raw_request(gw["port"], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"HTTP/2 with prior knowledge is not supported" in out


async def test_oversized_head_is_431(gw):
    big = b"x-big: " + b"a" * 40000 + b"\r\n"
    out = await raw_request(gw["port"], b"GET / HTTP/1.1\r\nHost: web\r\n" + big + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431") and b"headers_too_large" in out


async def test_what_follows_a_head_in_the_same_read_never_counts_as_head(gw):
    # The head limit (32 KiB) is checked against the reads a head arrived in, then measured
    # exactly when those are larger: a big body or many pipelined requests are not a big head.
    body = b"b" * 60000
    out = await raw_request(gw["port"], b"POST /sink HTTP/1.1\r\nHost: web\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    assert out.startswith(b"HTTP/1.1 200") and b'"size": 60000' in out
    one = b"GET /p HTTP/1.1\r\nHost: web\r\nx-pad: " + b"p" * 200 + b"\r\n\r\n"
    last = b"GET /p HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    out = await raw_request(gw["port"], one * 200 + last)  # 46 KB in one write
    assert out.count(b"HTTP/1.1 200") == 201 and b"headers_too_large" not in out


async def test_upstream_unavailable_and_timeout(gw, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    up = gw["up"]
    doc = demo_graph(up, **{"dead": {"parent": "baseline",
                                     "services": {"web": {"endpoints": [f"127.0.0.1:{dead}"]}}}})
    write_graph(gw["path"], doc)
    assert await gw["rt"].cell.wait_for(2, 5)
    resp, body = await get(gw, "/", Host="web", **{"x-stax-env": "dead"})
    assert resp.status == 502 and resp.headers["x-stax-error"] == "upstream_unavailable"
    assert resp.headers["x-stax-route"] == "web=local:dead@v2"  # raised after resolution
    resp, body = await get(gw, "/slow?ms=2000", Host="orders", **{"x-stax-env": "team-a"})
    assert resp.status == 504 and resp.headers["x-stax-error"] == "upstream_timeout"


async def test_graph_change_picked_up_by_running_gateway(gw):
    up = gw["up"]
    resp, _ = await get(gw, "/", Host="web", **{"x-stax-env": "team-a"})
    assert resp.headers["x-stax-route"] == "web=baseline:baseline@v1"
    doc = demo_graph(up)
    doc["envs"]["team-a"]["services"]["web"] = {"endpoints": [up["web-f1"].addr]}
    write_graph(gw["path"], doc)
    assert await gw["rt"].cell.wait_for(2, 5)
    resp, _ = await get(gw, "/", Host="web", **{"x-stax-env": "team-a"})
    assert resp.headers["x-stax-route"] == "web=local:team-a@v2"
    # a broken edit is rejected whole and v2 keeps serving
    with open(gw["path"], "w") as f:
        f.write("baseline: baseline\nenvs: {baseline: {parent: nope}, x: {parent: y}}\n")
    for _ in range(40):
        if gw["rt"].cell.rejected_total:
            break
        await asyncio.sleep(0.05)
    assert gw["rt"].cell.rejected_total == 1 and gw["rt"].cell.version == 2
    resp, _ = await get(gw, "/", Host="web", **{"x-stax-env": "team-a"})
    assert resp.status == 200


async def test_round_robin_goes_on_across_reloads(gw):
    """A change elsewhere in the graph keeps an answer's place in its endpoints: with one
    request between reloads (a quiet service while a control plane moves a cutover along),
    the requests still take turns, not all to the first endpoint."""
    up = gw["up"]
    doc = demo_graph(up)
    doc["envs"]["baseline"]["services"]["web"] = {"endpoints": [up["web-base"].addr, up["web-f1"].addr]}
    got = []
    for version in range(2, 7):
        doc["envs"]["feature-1"]["config"] = {"web.retries": version}  # not in team-a's chain
        write_graph(gw["path"], doc)
        assert await gw["rt"].cell.wait_for(version, 5)
        resp, body = await get(gw, "/", Host="web", **{"x-stax-env": "team-a"})
        assert resp.headers["x-stax-route"] == f"web=baseline:baseline@v{version}"
        got.append(json.loads(body)["upstream"])
    # v2 changed baseline: a new answer, whose turn starts at a random pick; then they alternate
    assert set(got) == {"web-base", "web-f1"} and all(a != b for a, b in itertools.pairwise(got)), got


async def test_metric_deltas(gw):
    async def scrape():
        admin = gw["rt"].admin_port
        async with gw["session"].get(f"http://127.0.0.1:{admin}/metrics") as resp:
            text = await resp.text()
        out = {}
        for line in text.splitlines():
            if line.startswith("stax_") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    key = 'stax_requests_total{code_class="2xx",kind="ancestor",mode="gateway",service="orders"}'
    before = await scrape()
    for _ in range(3):
        await get(gw, "/", Host="orders", **{"x-stax-env": "feature-1"})
    await get(gw, "/", Host="nosuch")
    after = await scrape()
    assert after[key] - before.get(key, 0) == 3
    assert after['stax_local_errors_total{code="no_provider"}'] - before.get(
        'stax_local_errors_total{code="no_provider"}', 0) == 1
    hist = 'stax_upstream_duration_seconds_count{kind="ancestor",service="orders"}'
    assert after[hist] - before.get(hist, 0) == 3
    assert after["stax_graph_version"] == 1


async def test_admin_endpoints(gw):
    admin = f"http://127.0.0.1:{gw['rt'].admin_port}"
    s = gw["session"]
    async with s.get(admin + "/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["ready"] and body["graph_version"] == 1
        assert body["source_connected"] is True and body["graph_age_s"] >= 0
    async with s.get(admin + "/debug/resolve?env=feature-1&service=orders") as r:
        body = await r.json()
        assert body["kind"] == "ancestor" and body["provider_env"] == "team-a"
        assert [c["env"] for c in body["chain"]] == ["feature-1", "team-a"]
        assert [c["provides"] for c in body["chain"]] == [False, True]
    async with s.get(admin + "/debug/resolve?env=nope&service=orders") as r:
        assert r.status == 404 and (await r.json())["error"] == "unknown_env"
    for bad in ("%ff", "Team-A", "a" * 5000):  # as a request naming it would be answered
        async with s.get(admin + f"/debug/resolve?env={bad}&service=orders") as r:
            body = await r.json()
            assert r.status == 400 and body["error"] == "bad_context", body
            assert len(body["message"]) < 200
    async with s.get(admin + "/debug/graph") as r:
        assert (await r.json())["baseline"] == "baseline"
    async with s.get(admin + "/healthz") as r:
        assert r.status == 200
