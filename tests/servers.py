"""Real upstream servers and in-process stax proxies on free ports (a pytest plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from loadtests.common import free_port  # noqa: F401  (one implementation, re-exported for tests)
from proxy.config import ProxyConfig
from proxy.main import start


class Echo:
    """An upstream that answers what it received, as JSON, and records every request.

    Paths: /status/N (answer N), /slow?ms=N (wait first), /bytes?n=N (N bytes, chunked when
    &chunked=1), /sink (read the body, answer its size), anything else: echo."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/sink":
            size = 0
            async for chunk in request.content.iter_chunked(1 << 16):
                size += len(chunk)
            self.seen.append({"method": request.method, "path": path, "size": size,
                              "headers": dict(request.headers)})
            return web.json_response({"size": size, "upstream": self.name})
        body = await request.read()
        record = {
            "upstream": self.name, "method": request.method, "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "header_list": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.seen.append(record)
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            return web.Response(status=status, body=None if status in (204, 304) else b"status",
                                headers={"x-upstream": self.name})
        if path == "/slow":
            await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
        if path == "/bytes":
            n = int(request.query.get("n", "0"))
            if request.query.get("chunked"):
                resp = web.StreamResponse(headers={"x-upstream": self.name})
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                block = b"x" * 65536
                while n > 0:
                    await resp.write(block[: min(n, len(block))])
                    n -= len(block)
                await resp.write_eof()
                return resp
            return web.Response(body=b"x" * n, headers={"x-upstream": self.name})
        return web.Response(body=orjson.dumps(record), content_type="application/json",
                            headers={"x-upstream": self.name})

    async def start(self, port: int = 0) -> Echo:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def serve_app(app: web.Application, *, ssl_context=None) -> tuple[web.AppRunner, int]:
    """Start an aiohttp app on a free loopback port: (runner to clean up, port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def upstreams():
    """upstreams(name, ...) -> started Echo servers; all stopped at the end."""
    started: list[Echo] = []

    async def make(*names: str) -> list[Echo]:
        out = [await Echo(n).start() for n in names]
        started.extend(out)
        return out

    yield make
    for e in started:
        await e.stop()


async def raw_upstream(handle) -> tuple[asyncio.Server, str]:
    """An asyncio server on a free port running `handle(reader, writer)`, for upstreams that
    misbehave on purpose: (server, "127.0.0.1:port")."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def eventually(check, timeout: float = 2.0) -> None:
    """Wait until `check()` is true or `timeout` passes; the caller asserts what it needs."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def write_graph(path, doc: dict) -> str:
    """Write a graph atomically (as a control plane would) and return the path."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(doc, f)
    os.replace(tmp, path)
    return str(path)


@pytest.fixture
async def proxies():
    """proxies(mode, **config) -> a started in-process Runtime; stopped at the end."""
    started = []

    async def make(mode: str, *, tracer_provider=None, **kw):
        kw.setdefault("listen", "127.0.0.1:0")
        kw.setdefault("admin", "127.0.0.1:0")
        if mode == "sidecar":
            kw.setdefault("egress", "127.0.0.1:0")
        rt = await start(ProxyConfig(mode=mode, **kw), tracer_provider=tracer_provider)
        started.append(rt)
        return rt

    yield make
    for rt in started:
        with contextlib.suppress(Exception):
            await rt.stop()


def port_of(rt, name: str) -> int:
    return next(lst.port for lst in rt.listeners if lst.name == name)


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    writer.close()
    return b"".join(chunks)


async def read_response(reader, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """One Content-Length response from a raw connection: (head, body). The timeout only
    turns a response that never comes into a failure, not a hang."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    fields = (line.partition(b": ") for line in head.split(b"\r\n")[1:])
    length = next((int(v) for k, _, v in fields if k.lower() == b"content-length"), 0)
    return head, await asyncio.wait_for(reader.readexactly(length), timeout)


def gateway_process(graph, *extra: str, env: dict | None = None,
                    preexec=None) -> tuple[subprocess.Popen, int, int]:
    """`stax gateway` as a real process on free ports (for signals and exit codes): (process,
    listen port, admin port). Await wait_ready(admin, process) before using it. `preexec`:
    run in the child before it starts (e.g. to lower a resource limit)."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "gateway", "--graph", str(graph),
                             "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                             "--log-level", "warning", *extra], env=env, stderr=subprocess.PIPE,
                            preexec_fn=preexec)
    return proc, port, admin


@contextlib.asynccontextmanager
async def running_gateway(graph, *extra: str, env: dict | None = None):
    """`stax gateway` as a real process, ready: yields (process, listen port, admin port);
    terminated at the end. `env`: the process's whole environment."""
    proc, port, admin = gateway_process(graph, *extra, env=env)
    try:
        await wait_ready(admin, proc)
        yield proc, port, admin
    finally:
        proc.terminate()
        proc.wait(10)


async def wait_ready(port: int, proc) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            if proc.poll() is not None:
                raise AssertionError(f"stax exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("stax did not become ready")
