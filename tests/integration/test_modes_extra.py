"""Smaller mode features end to end: subdomain env, Redis-fed gateway picking up a push,
the demo over Redis, a trickled request body, configuration precedence."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import aiohttp
import pytest

from proxy.config import ProxyConfig, add_proxy_args, config_from_args
from resolver.sources.redis_store import RedisStore
from tests.servers import port_of, raw_request, write_graph


def two_env_graph(a: str, b: str) -> dict:
    return {"baseline": "base", "envs": {
        "base": {"services": {"web": {"endpoints": [a]}}},
        "team-a": {"parent": "base", "services": {"web": {"endpoints": [b]}}}}}


async def test_env_from_subdomain(tmp_path, upstreams, proxies):
    a, b = await upstreams("a", "b")
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", two_env_graph(a.addr, b.addr)),
                       env_host_suffix="preview.example.com")
    url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Host": "web.team-a.preview.example.com"}) as r:
            assert r.headers["x-stax-route"] == "web=local:team-a@v1"
        async with s.get(url, headers={"Host": "web.team-a.preview.example.com", "x-stax-env": "base"}) as r:
            assert r.headers["x-stax-route"] == "web=local:base@v1"  # headers win over the subdomain
        async with s.get(url, headers={"Host": "web.Bad_Env.preview.example.com"}) as r:
            assert r.status == 400 and r.headers["x-stax-error"] == "bad_context"


async def test_redis_fed_gateway_picks_up_a_push(redis_server, upstreams, proxies):
    a, b = await upstreams("a", "b")
    store = RedisStore(redis_server.url)
    try:
        await store.push(two_env_graph(a.addr, b.addr))
        rt = await proxies("gateway", redis=redis_server.url)
        url = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Host": "web", "x-stax-env": "team-a"}) as r:
                assert r.headers["x-upstream"] == "b" and r.headers["x-stax-route"] == "web=local:team-a@v1"
            doc = two_env_graph(a.addr, b.addr)
            del doc["envs"]["team-a"]["services"]
            await store.push(doc, expect_version=1)
            assert await rt.cell.wait_for(2, 5)
            async with s.get(url, headers={"Host": "web", "x-stax-env": "team-a"}) as r:
                assert r.headers["x-upstream"] == "a" and r.headers["x-stax-route"] == "web=baseline:base@v2"
    finally:
        await store.close()


async def test_demo_over_redis(redis_server):
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "control.cli", "demo", "--redis",
                                                   redis_server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "graph from Redis" in out.stdout and "ancestor" in out.stdout and "shared" in out.stdout


async def test_trickled_request_body_is_cut_off(tmp_path, upstreams, proxies):
    (up,) = await upstreams("up")
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [up.addr]}},
                                           "config": {"svc.idle_timeout_ms": 300}}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    writer.write(b"POST /sink HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\nabc")
    got = await asyncio.wait_for(reader.read(4096), 5)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got
    writer.close()
    out = await raw_request(port_of(rt, "gateway"), b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")


def parse(argv: list[str], environ: dict, mode: str = "gateway") -> ProxyConfig:
    import argparse

    p = argparse.ArgumentParser()
    add_proxy_args(p, mode)
    return config_from_args(p.parse_args(argv), mode, environ)


def test_config_precedence_flag_env_file(tmp_path):
    f = tmp_path / "stax.yaml"
    f.write_text("graph: g.yaml\nmax-hops: 7\nheader_timeout: 3.5\ndefault-env: from-file\n")
    cfg = parse(["--config", str(f)], {})
    assert (cfg.max_hops, cfg.header_timeout, cfg.default_env) == (7, 3.5, "from-file")
    cfg = parse(["--config", str(f)], {"STAX_MAX_HOPS": "9", "STAX_DEFAULT_ENV": "from-env"})
    assert (cfg.max_hops, cfg.default_env) == (9, "from-env")
    cfg = parse(["--config", str(f), "--max-hops", "11"], {"STAX_MAX_HOPS": "9"})
    assert cfg.max_hops == 11
    cfg = parse(["--graph", "g.yaml"], {"STAX_ROUTE_PREFIX": "/a=x,/b=y", "STAX_ACCESS_LOG": "true"})
    assert cfg.route_prefix == ["/a=x", "/b=y"] and cfg.access_log is True


def test_config_rejects_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="exactly one graph source"):
        parse([], {})
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse(["--graph", "g", "--listen", "nope"], {})
    with pytest.raises(ValueError, match="allow-list needs"):
        parse(["--graph", "g", "--context-policy", "allow-list"], {})
    f = tmp_path / "bad.yaml"
    f.write_text("grpah: x\n")
    with pytest.raises(ValueError, match="unknown setting"):
        parse(["--config", str(f)], {})
    # numbers in range and of their type, from the environment, a flag or the file alike
    for environ, why in [
        ({"STAX_MAX_INFLIGHT": "abc"}, "STAX_MAX_INFLIGHT='abc' is not a number"),
        ({"STAX_MAX_INFLIGHT": "0"}, "--max-inflight must be > 0, got 0"),
        ({"STAX_CONNECT_TIMEOUT": "-1"}, "--connect-timeout must be > 0, got -1.0"),
        ({"STAX_HEADER_TIMEOUT": "nan"}, "--header-timeout must be a number, got nan"),
        ({"STAX_DRAIN_TIMEOUT": "-0.5"}, "--drain-timeout must be >= 0"),
        ({"STAX_LOG_LEVEL": "loud"}, "--log-level must be one of debug, info, warning, error"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse(["--graph", "g"], environ)
    with pytest.raises(ValueError, match="--keepalive-timeout must be > 0"):
        parse(["--graph", "g", "--keepalive-timeout", "0"], {})
    for text, why in [("connect_timeout: soon\n", "--connect-timeout must be a number, got 'soon'"),
                      ("max_inflight: 2.5\n", "--max-inflight must be an integer, got 2.5"),
                      ("access_log: 1\n", "--access-log must be true or false, got 1"),
                      ("listen: 8080\n", "--listen must be a string, got 8080"),
                      ("route_prefix: 5\n", "--route-prefix must be a list of strings, got 5")]:
        f.write_text("graph: g\n" + text)
        with pytest.raises(ValueError, match=re.escape(why)):
            parse(["--config", str(f)], {})
    # names that could never match a graph's, networks that do not parse, files that do not load
    key = tmp_path / "short.key"
    key.write_text("short")
    for argv, why in [
        (["--route-prefix", "/p=Bad_Svc"], "--route-prefix '/p=Bad_Svc': want /PATH=SERVICE"),
        (["--default-env", "Team_A"], "--default-env 'Team_A' is not a valid name"),
        (["--context-policy", "allow-list", "--context-allow", "ok,Not_OK"], "--context-allow 'Not_OK' is not a valid name"),
        (["--trusted-proxies", "10.0.0.9,999.1.1.1"], "--trusted-proxies: '999.1.1.1' is not an IP address or network"),
        (["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key")], "cannot load it: No such file"),
        (["--tls-cert", str(key), "--tls-key", str(key)], "cannot load it: [SSL]"),
        (["--upstream-ca", str(key)], f"--upstream-ca {key}: cannot load it"),
        (["--env-token-key", str(tmp_path / "none")], "cannot load it: No such file"),
        (["--env-token-key", str(key)], "env token key must be at least 16 bytes"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse(["--graph", "g", *argv], {})
    with pytest.raises(ValueError, match=re.escape("--env 'Team_A' is not a valid name")):
        parse(["--graph", "g", "--env", "Team_A", "--service", "web", "--app", "127.0.0.1:1"], {}, mode="sidecar")
    # a list setting is repeated, comma-separated or both, from a flag as from the environment
    cfg = parse(["--graph", "g", "--trusted-proxies", "10.0.0.9, 10.1.0.0/16", "--trusted-proxies", "::1"], {})
    assert cfg.trusted_proxies == ["10.0.0.9", "10.1.0.0/16", "::1"]
    # where 0 means none or at once, it is allowed
    cfg = parse(["--graph", "g"], {"STAX_POOL_MAX_IDLE": "0", "STAX_DRAIN_TIMEOUT": "0"})
    assert (cfg.pool_max_idle, cfg.drain_timeout) == (0, 0.0)


async def test_access_log_one_json_line_per_request(tmp_path, upstreams, proxies, caplog):
    import logging

    (up,) = await upstreams("up")
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [up.addr]}}}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc), access_log=True)
    port = port_of(rt, "gateway")
    with caplog.at_level(logging.INFO, logger="stax.access"):
        await raw_request(port, b"GET /a?x=1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        await raw_request(port, b"GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n")
    lines = [r.msg for r in caplog.records if r.name == "stax.access"]
    assert len(lines) == 2
    ok, missing = lines
    assert (ok["status"], ok["path"], ok["service"], ok["kind"], ok["env"]) == (200, "/a?x=1", "svc", "local", "b")
    assert ok["endpoint"] == f"http://{up.addr}" and len(ok["trace_id"]) == 32 and ok["duration_ms"] >= 0
    assert (missing["status"], missing["service"], missing["kind"]) == (404, "nosuch", None)


async def test_no_access_log_by_default(tmp_path, upstreams, proxies, caplog):
    import logging

    (up,) = await upstreams("up")
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [up.addr]}}}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc))
    with caplog.at_level(logging.INFO, logger="stax.access"):
        out = await raw_request(port_of(rt, "gateway"), b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert not [r for r in caplog.records if r.name == "stax.access"]


async def test_idle_connections_are_closed_after_their_timeouts(tmp_path, upstreams, proxies):
    # Idle clocks are stamped by the 1 s sweeper, not per request: a close comes up to a sweep
    # late, never early.
    (up,) = await upstreams("up")
    doc = {"baseline": "b", "envs": {"b": {"services": {"svc": {"endpoints": [up.addr]}}}}}
    rt = await proxies("gateway", graph=write_graph(tmp_path / "g.yaml", doc),
                       keepalive_timeout=1.5, pool_idle_timeout=1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rt, "gateway"))
    request = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"
    for _ in range(3):  # used more often than the timeout: kept
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert rt.pool.idle_count == 1
        await asyncio.sleep(0.8)
    assert rt.pool.idle_count == 1 and len(rt.connections) == 1
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed by the proxy
    for _ in range(50):
        if rt.pool.idle_count == 0:
            break
        await asyncio.sleep(0.1)
    assert rt.pool.idle_count == 0 and len(rt.connections) == 0
    writer.close()
