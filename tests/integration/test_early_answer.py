"""A response that comes before the client has sent its whole body (an upstream answering
413 at once, or stax refusing the request): the client reads the whole response, a long body
is not read forever, a short one is, and the connection goes on."""

from __future__ import annotations

import asyncio

import pytest

from tests.servers import port_of, read_response, write_graph

pytestmark = pytest.mark.asyncio
FRAME = b"x" * 65536


async def _early_upstream():
    """Answers a POST with 413 as soon as its head arrives and reads on (a lenient app that
    never closes first); answers a GET with 200."""
    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
                while await reader.read(65536):
                    pass
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def gateway(tmp_path, proxies):
    server, port = await _early_upstream()
    path = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"up": {"endpoints": [f"127.0.0.1:{port}"]}}}}})
    rt = await proxies("gateway", graph=path)
    yield port_of(rt, "gateway"), rt
    server.close()


async def _upload_and_read(port: int, head: bytes, frame: bytes, *, read_after: float = 0.0) -> bytes:
    """Send `head`, then `frame` over and over while reading everything the proxy sends up to
    its close. The timeout only turns a connection held open into a failure, not a hang."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)

    async def pump():
        try:
            while True:
                writer.write(frame)
                await writer.drain()
        except ConnectionError:
            pass

    task = asyncio.create_task(pump())
    try:
        await asyncio.sleep(read_after)  # keep sending while the response waits unread
        return await asyncio.wait_for(reader.read(), 10)  # to EOF; a reset raises
    finally:
        task.cancel()
        writer.close()


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked", b"Content-Length: 100000000"])
async def test_early_answer_to_a_long_upload_is_read_whole_then_the_connection_closes(gateway, framing):
    frame = b"%x\r\n%b\r\n" % (len(FRAME), FRAME) if b"chunked" in framing else FRAME
    out = await _upload_and_read(gateway[0], b"POST /up HTTP/1.1\r\nHost: up\r\n" + framing + b"\r\n\r\n",
                                 frame, read_after=0.3)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    # a declared 100 MB will not be read: said at once; a chunked body is read up to 1 MiB
    assert (b"connection: close" in head.lower()) == (b"chunked" not in framing)
    assert body == b"too big!"


async def test_refused_long_upload_still_reads_the_whole_error(gateway):
    # stax refuses at the head (unknown env) while the client keeps sending: the close must
    # not reset the connection under the unread error response
    out = await _upload_and_read(
        gateway[0], b"POST /up HTTP/1.1\r\nHost: up\r\nx-stax-env: nope\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%b\r\n" % (len(FRAME), FRAME), read_after=0.3)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert b"unknown_env" in out and body.endswith(b"}")


async def test_refused_short_chunked_body_is_read_and_the_next_request_answered(gateway):
    # refused at its head (unknown env), a small chunked body is dropped, not a reason to close
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway[0])
    writer.write(b"POST /up HTTP/1.1\r\nHost: up\r\nx-stax-env: nope\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: up\r\n\r\n")
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 404 ") and b"connection: close" not in head.lower()
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_early_answer_to_a_short_body_reads_the_rest_and_keeps_the_connection(gateway):
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway[0])
    writer.write(b"POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" not in head.lower()
    assert await asyncio.wait_for(reader.readexactly(8), 5) == b"too big!"
    writer.write(b"b" * 900 + b"GET /next HTTP/1.1\r\nHost: up\r\n\r\n")  # the rest, then another
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
    writer.close()


async def test_a_client_that_sends_on_forever_is_cut_off_after_the_linger(gateway):
    port, rt = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n")
    frame = b"%x\r\n%b\r\n" % (len(FRAME), FRAME)

    async def pump() -> int:
        sent = 0
        try:
            while True:  # never stops on its own, never closes
                writer.write(frame)
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.01)
        except ConnectionError:
            return sent

    task = asyncio.create_task(pump())
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 413 ")  # then FIN
    assert len(rt.connections) == 1  # lingering: still reading (and dropping) what comes
    sent = await asyncio.wait_for(task, 15)  # LINGER_S (5 s) plus a sweep: then closed for good
    assert sent > 0 and len(rt.connections) == 0
    writer.close()
