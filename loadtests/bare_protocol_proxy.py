"""The floor for a Python proxy on this machine: an asyncio.Protocol fed to httptools on
uvloop, one upstream connection per client connection, the request head rebuilt from the
parsed headers, the response streamed back. No routing, context, metrics, timeouts, retries,
pooling or error handling: what stax's data plane would cost with every feature removed.
A bench reference only, never a proxy to deploy.

    python -m loadtests.bare_protocol_proxy --listen 127.0.0.1:8081 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.out:
            self.client.transport.write(b"".join(self.out))
            self.out = []

    def on_headers_complete(self) -> None:
        self.out = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code(), *self.head, b"\r\n"]

    def on_message_begin(self) -> None:
        self.head = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() != b"connection":
            self.head.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_addr = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        _, self.upstream = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(self), *self.upstream_addr)
        if self.pending:
            self.upstream.transport.write(b"".join(self.pending))
            self.pending = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.head: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.head.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self._send(b"%s %s HTTP/1.1\r\n%s\r\n" % (self.parser.get_method(), self.url, b"".join(self.head)))

    def _send(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8081")
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    uhost, _, uport = args.upstream.rpartition(":")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Client((uhost, int(uport))), host, int(port))
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
