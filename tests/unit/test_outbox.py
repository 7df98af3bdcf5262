"""The Outbox holds whole upstream requests to the end of the loop's round, over real TCP."""

from __future__ import annotations

import asyncio

import pytest

from proxy.outbox import Outbox

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def peers():
    """connect() -> (client transport, StreamReader of the server's side), on real sockets."""
    readers: asyncio.Queue = asyncio.Queue()

    async def accepted(reader, writer):
        await readers.put(reader)

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports = []

    async def connect():
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port)
        transports.append(transport)
        return transport, await readers.get()

    yield connect
    for transport in transports:
        transport.abort()
    server.close()


async def _read(reader, n: int = -1) -> bytes:
    """n bytes (or to EOF); the timeout only turns a lost write into a failure, not a hang."""
    return await asyncio.wait_for(reader.readexactly(n) if n >= 0 else reader.read(), 5)


def _loop_errors() -> list:
    errors: list = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    return errors


async def test_held_to_the_end_of_the_round_then_written_in_order(peers):
    (a, a_peer), (b, b_peer) = await peers(), await peers()
    outbox = Outbox(asyncio.get_running_loop())
    outbox.send(a, b"1")
    outbox.send(b, b"x")
    outbox.send(a, b"2")
    a.write(b"0")  # written at once: the outbox's bytes come after it, at the round's end
    assert await _read(a_peer, 3) == b"012"
    assert await _read(b_peer, 1) == b"x"
    assert outbox.pending == []


async def test_a_transport_closed_meanwhile_gets_nothing_and_holds_back_no_one(peers):
    errors = _loop_errors()
    (a, a_peer), (b, b_peer) = await peers(), await peers()
    outbox = Outbox(asyncio.get_running_loop())
    outbox.send(a, b"lost")
    outbox.send(b, b"kept")
    a.abort()  # as when an exchange drops its upstream connection in the same round
    assert await _read(b_peer, 4) == b"kept"
    assert await _read(a_peer) == b""
    assert errors == []


async def test_a_write_that_fails_aborts_its_transport_only(peers):
    errors = _loop_errors()
    (a, a_peer), (b, b_peer) = await peers(), await peers()

    class Failing:  # a real transport whose write fails (fault injection)
        is_closing = a.is_closing
        abort = a.abort

        def write(self, data):
            raise OSError("injected")

    outbox = Outbox(asyncio.get_running_loop())
    outbox.send(Failing(), b"never")
    outbox.send(b, b"still sent")
    assert await _read(b_peer, 10) == b"still sent"
    assert await _read(a_peer) == b""  # aborted
    assert a.is_closing()
    assert errors == []
