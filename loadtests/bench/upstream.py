"""The built-in fixed-response upstream (used when nginx is not installed): an asyncio.Protocol
with httptools on uvloop. GET /small, /16k, /1m; echoes what stax rewrites (x-stax-env,
x-stax-hops, traceparent, baggage) back as x-seen-* response headers, as the nginx upstream does.

    python -m loadtests.bench.upstream --port 8000
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

BODIES = {b"/small": b"hello, stax\n", b"/16k": b"x" * 16384, b"/1m": b"y" * (1 << 20)}
ECHO = {b"x-stax-env": b"x-seen-env", b"x-stax-hops": b"x-seen-hops",
        b"traceparent": b"x-seen-traceparent", b"baggage": b"x-seen-baggage"}
HEADS = {path: b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
               b"content-length: %d\r\n" % len(body) for path, body in BODIES.items()}
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.echo: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.echo = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        seen = ECHO.get(name.lower())
        if seen is not None:
            self.echo.append(seen + b": " + value + b"\r\n")

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        body = BODIES.get(path)
        if body is None:
            self.transport.write(NOT_FOUND)
        else:
            self.transport.write(b"".join([HEADS[path], *self.echo, b"\r\n", body]))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
