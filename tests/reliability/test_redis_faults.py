"""RedisSource under faults, against a real redis-server: Redis killed and restarted, the
pub/sub connection killed or silently dead, a cache file when Redis is down, bad documents
written behind the store's back, version regressions and new epochs, corrupt keys."""

from __future__ import annotations

import asyncio
import os

import pytest

from resolver.errors import StoreUnavailable
from resolver.sources import redis_store
from resolver.sources.redis_store import RedisStore
from resolver.sources.redis_sync import RedisSource
from resolver.sync import SnapshotCell
from tests.redis_fixture import example_graph, running_source, wait_until

DOC, VERSION, EPOCH, CHANNEL = ("stax:{graph}:doc", "stax:{graph}:version", "stax:{graph}:epoch",
                                "stax:{graph}:changes")


@pytest.fixture
async def store(redis_server):
    s = RedisStore(redis_server.url, socket_timeout=1.0)
    yield s
    await s.close()


def with_env(name: str, parent: str = "baseline") -> dict:
    doc = example_graph()
    doc["envs"][name] = {"parent": parent, "services": {"web": ["127.0.0.1:7999"]}}
    return doc


async def test_redis_killed_keeps_serving_then_catches_up_after_restart(store, redis_server):
    await store.push(example_graph())
    v = await store.push(with_env("team-b"))
    async with running_source(store, poll_interval=0.1, ping_interval=0.5,
                              ping_timeout=0.5) as (cell, source):
        assert cell.version == v and cell.source_connected
        serving = cell.current
        old_epoch = serving.graph.epoch

        redis_server.stop()
        assert await wait_until(lambda: not cell.source_connected, 5)
        assert await wait_until(lambda: cell.sync_errors_total >= 2, 5)  # it keeps trying
        assert cell.current is serving  # the last good snapshot keeps serving
        assert "127.0.0.1" in cell.last_error
        with pytest.raises(StoreUnavailable):  # control writes fail with a clear error
            await store.push(example_graph())

        redis_server.start()  # no persistence: an empty store, and the next push a new epoch
        newer = with_env("after-restart")
        await store.push(newer)
        assert await wait_until(
            lambda: cell.current.graph.epoch not in ("", old_epoch), 10), cell
        assert "after-restart" in cell.current.graph.envs
        assert cell.source_connected and not cell.regression
        # and it keeps following: pub/sub was resubscribed
        v2 = await store.push(with_env("later"))
        assert await cell.wait_for(v2, 5)
        assert "later" in cell.current.graph.envs
        assert source.errors_total >= 2


async def test_pubsub_connection_killed_polling_catches_up(store, redis_server):
    await store.push(example_graph())
    poll = 0.5
    async with running_source(store, poll_interval=poll) as (cell, source):
        assert await wait_until(
            lambda: len(redis_server.client().client_list(_type="pubsub")) == 1, 5)
        killed = redis_server.client().client_kill_filter(_type="pubsub")
        assert killed == 1
        for i in range(4):
            v = await store.push(with_env(f"e{i}"))
        assert await cell.wait_for(v, timeout=2 * poll + 2)
        assert "e3" in cell.current.graph.envs
        assert cell.sync_errors_total == 0  # the command connection never failed
        # the listener resubscribed: one pubsub client again, and pushes arrive
        assert await wait_until(lambda: source.pubsub_reconnects >= 1, 5)
        assert await wait_until(
            lambda: len(redis_server.client().client_list(_type="pubsub")) == 1, 5)


class FreezableRelay:
    """A TCP relay to Redis whose existing connections can go silently dead: bytes are
    swallowed both ways, nothing is closed (a partition, a dead NAT entry). New connections
    still work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._frozen: list[dict] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze_existing(self) -> None:
        for state in self._frozen:
            state["frozen"] = True

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        state = {"frozen": False}
        self._frozen.append(state)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    if not state["frozen"]:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_silently_dead_connections_are_replaced(store, redis_server):
    await store.push(example_graph())
    relay = FreezableRelay(redis_server.port)
    await relay.start()
    via_relay = RedisStore(f"redis://127.0.0.1:{relay.port}/0", socket_timeout=0.5)
    try:
        # Polling is effectively off: only the listener's ping can notice the dead connection.
        async with running_source(via_relay, poll_interval=60, ping_interval=0.2,
                                  ping_timeout=0.3) as (cell, source):
            assert cell.version == 1
            assert await wait_until(
                lambda: len(redis_server.client().client_list(_type="pubsub")) == 1, 5)
            await asyncio.sleep(0.2)  # let the poll that follows subscribing finish
            relay.freeze_existing()
            v = await store.push(with_env("through-the-partition"))  # published, never delivered
            assert await cell.wait_for(v, timeout=10)
            assert source.pubsub_reconnects >= 1
            v = await store.push(with_env("after"))
            assert await cell.wait_for(v, timeout=5)
    finally:
        await via_relay.close()
        await relay.close()


async def test_cache_file_serves_when_redis_is_down(store, redis_server, tmp_path):
    cache = str(tmp_path / "graph.json")
    await store.push(example_graph())
    v = await store.push(with_env("cached-env"))
    async with running_source(store, poll_interval=0.1, cache_file=cache) as (cell, _):
        assert cell.version == v
    assert await wait_until(lambda: os.path.exists(cache), 5)
    redis_server.stop()

    cell = SnapshotCell()
    source = RedisSource(store, cell, poll_interval=0.1, cache_file=cache)
    try:
        await source.start(wait=1)
        assert cell.current is not None, "the cached graph must serve while Redis is down"
        assert cell.version == v and "cached-env" in cell.current.graph.envs
        assert cell.current.source == f"cache:{cache}"
        assert not cell.source_connected
        assert source.full_loads == 0

        redis_server.start()  # back, empty: the cache keeps serving until a graph is pushed
        assert await wait_until(lambda: cell.source_connected, 5)
        assert cell.current.source == f"cache:{cache}"
        await store.push(with_env("fresh"))  # v1 of a new epoch replaces the cached v2
        assert await wait_until(lambda: "fresh" in cell.current.graph.envs, 5)
        assert cell.current.source.startswith("redis:")
    finally:
        await source.stop()


async def test_start_with_nothing_anywhere_then_push(store):
    async with running_source(store, wait=0.3, poll_interval=0.1) as (cell, source):
        assert cell.current is None  # not ready; the loop keeps trying
        assert cell.source_connected
        v = await store.push(example_graph())
        assert await cell.wait_for(v, 5)
        assert source.full_loads == 1


async def test_bad_document_written_directly_is_rejected(store, redis_server):
    await store.push(example_graph())
    v = await store.push(with_env("good"))
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.1) as (cell, source):
        serving = cell.current
        assert serving.version == v

        # an invalid graph, bypassing push: rejected, the old snapshot keeps serving
        raw.set(DOC, b'{"baseline": "nope", "envs": {"x": {"parent": "y"}}}')
        bad_version = raw.incr(VERSION)
        raw.publish(CHANNEL, bad_version)
        assert await wait_until(lambda: cell.rejected_total == 1, 5)
        assert cell.current is serving
        assert "nope" in cell.last_error
        await asyncio.sleep(0.3)  # later polls do not reject the same version again
        assert cell.rejected_total == 1 and cell.current is serving

        # not even JSON
        raw.set(DOC, b"\x00garbage{")
        raw.publish(CHANNEL, raw.incr(VERSION))
        assert await wait_until(lambda: cell.rejected_total == 2, 5)
        assert cell.current is serving and "not JSON" in cell.last_error

        # a good push after the bad ones is served (deltas cannot bridge them: full load)
        loads = source.full_loads
        v = await store.push(with_env("fixed"))
        assert await cell.wait_for(v, 5)
        assert "fixed" in cell.current.graph.envs
        assert source.full_loads == loads + 1
        assert cell.source_connected and cell.sync_errors_total == 0


async def test_invalid_graph_arriving_as_a_delta_is_rejected_then_bridged(store, monkeypatch):
    """A delta that yields a graph this proxy rejects (say, pushed by a newer control plane
    with looser rules) is rejected; the next good version is reached through both deltas."""
    await store.push(example_graph())
    async with running_source(store, poll_interval=0.1) as (cell, source):
        serving = cell.current
        monkeypatch.setattr(redis_store, "parse_graph", lambda doc, version=None: None)
        bad = example_graph()
        bad["envs"]["orphan"] = {"parent": "missing"}
        v_bad = await store.push(bad)
        monkeypatch.undo()
        assert await wait_until(lambda: cell.rejected_total == 1, 5)
        assert cell.current is serving and "missing parent 'missing'" in cell.last_error
        v = await store.push(with_env("ok"))
        assert v == v_bad + 1
        assert await cell.wait_for(v, 5)
        assert "orphan" not in cell.current.graph.envs and "ok" in cell.current.graph.envs
        assert source.full_loads == 1 and source.delta_loads == 1


async def test_version_regression_in_same_epoch_is_held_then_adopted(store, redis_server):
    await store.push(example_graph())
    await store.push(with_env("v2"))
    v3 = await store.push(with_env("v3"))
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.1, regression_hold=0.5) as (cell, source):
        serving = cell.current
        assert serving.version == v3
        # The store goes back to an older graph in the same epoch (a stale replica promoted).
        raw.set(DOC, raw.get(DOC).replace(b'"v3"', b'"old"'))
        raw.set(VERSION, 1)
        raw.publish(CHANNEL, 1)
        assert await wait_until(lambda: cell.regression, 5)
        assert cell.current is serving  # held: keeps serving v3
        assert await wait_until(lambda: cell.version == 1, 5)  # adopted after the hold
        assert not cell.regression
        assert "old" in cell.current.graph.envs
        # and it follows the store from there
        v = await store.push(with_env("next"))
        assert v == 2 and await wait_until(lambda: "next" in cell.current.graph.envs, 5)
        assert cell.rejected_total == 0


async def test_regression_that_recovers_within_the_hold_is_not_adopted(store, redis_server):
    await store.push(example_graph())
    v = await store.push(with_env("keep"))
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.1, regression_hold=30) as (cell, source):
        serving = cell.current
        raw.set(VERSION, 1)
        assert await wait_until(lambda: cell.regression, 5)
        assert cell.current is serving
        raw.set(VERSION, v)  # the store comes back
        assert await wait_until(lambda: not cell.regression, 5)
        assert cell.version == v and "keep" in cell.current.graph.envs


async def test_operator_push_during_a_regression_is_adopted_at_once(store, redis_server):
    await store.push(example_graph())
    await store.push(with_env("v2"))
    v3 = await store.push(with_env("v3"))
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.1, regression_hold=30) as (cell, source):
        assert cell.version == v3
        raw.set(VERSION, 1)  # a stale replica promoted: v1 in the same epoch
        assert await wait_until(lambda: cell.regression, 5)
        v = await store.push(with_env("fixed"))  # the operator's `stax graph push`
        assert v == 2
        assert await wait_until(lambda: "fixed" in cell.current.graph.envs, 5)  # not held 30 s
        assert cell.version == 2 and not cell.regression


async def test_new_epoch_is_adopted_at_once(store, redis_server):
    await store.push(example_graph())
    await store.push(with_env("a"))
    await store.push(with_env("b"))
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.1, regression_hold=30) as (cell, source):
        assert cell.version == 3
        raw.delete(DOC, VERSION, EPOCH)  # a wiped store, then a fresh first push
        await store.push(with_env("new-lineage"))
        assert await wait_until(lambda: "new-lineage" in cell.current.graph.envs, 5)
        assert cell.version == 1 and not cell.regression
        assert cell.current.graph.epoch == await store.epoch()


async def test_corrupt_keys_never_kill_the_loop(store, redis_server):
    await store.push(example_graph())
    raw = redis_server.client()
    async with running_source(store, poll_interval=0.05) as (cell, source):
        serving = cell.current
        raw.set(VERSION, b"not-a-number")
        assert await wait_until(lambda: cell.sync_errors_total >= 2, 5)
        assert cell.current is serving and not cell.source_connected
        raw.delete(VERSION)
        raw.set(VERSION, 1)
        v = await store.push(with_env("recovered"))
        assert await cell.wait_for(v, 5)
        assert cell.source_connected
        # a wrong-type key is an error too, and the loop survives it
        raw.delete(EPOCH)
        raw.lpush(EPOCH, "x")
        errors = cell.sync_errors_total
        assert await wait_until(lambda: cell.sync_errors_total > errors, 5)
        raw.delete(EPOCH)
        raw.set(EPOCH, cell.current.graph.epoch)
        v = await store.push(with_env("again"))
        assert await cell.wait_for(v, 5)
        assert source._tasks and not any(t.done() for t in source._tasks)
