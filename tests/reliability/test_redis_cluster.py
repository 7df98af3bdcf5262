"""Redis Cluster through `redis+cluster://` URLs, beyond the happy path of
test_redis_topologies.py: URL parsing, discovery through any reachable node, a resharding that
moves the graph's slot to another master, the slot's master dying and coming back empty, and
a cluster that cannot be reached at all. Real redis-server processes, as there.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from resolver.errors import StoreUnavailable
from resolver.sources.redis_store import RedisStore, parse_cluster_url, redact_url
from tests.redis_fixture import (
    RedisServer,
    example_graph,
    free_port,
    push_until,
    running_source,
    tls_files,
    wait_until,
)
from tests.reliability import test_redis_topologies as topologies

REDIS_SERVER, REDIS_CLI = topologies.REDIS_SERVER, topologies.REDIS_CLI
redis_cluster = topologies.redis_cluster  # the fixture: three masters, no replicas

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server and redis-cli are needed (Debian/Ubuntu: apt-get install redis-server)")


def _url(nodes: list[RedisServer]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)


def _slot_and_owner(nodes: list[RedisServer], store: RedisStore) -> tuple[int, RedisServer]:
    """The slot of the graph's keys and the master that holds them (after a push)."""
    with nodes[0].client() as c:
        slot = c.execute_command("CLUSTER", "KEYSLOT", store.version_key)
    owners = []
    for n in nodes:
        with n.client() as c:
            if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot):
                owners.append(n)
    assert len(owners) == 1, owners
    return slot, owners[0]


def _node_id(node: RedisServer) -> str:
    with node.client() as c:
        return c.execute_command("CLUSTER", "MYID").decode()


def _migrate_slot(nodes: list[RedisServer], slot: int, src: RedisServer,
                  dst: RedisServer) -> None:
    """Move one slot and its keys from src to dst, as `redis-cli --cluster reshard` does."""
    src_id, dst_id = _node_id(src), _node_id(dst)
    with src.client() as s, dst.client() as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
    for n in (dst, src, *(n for n in nodes if n not in (src, dst))):
        with n.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_cluster_url_parsing():
    cu = parse_cluster_url("redis+cluster://h1:7000,h2,[::1]:7002")
    assert cu.nodes == [("h1", 7000), ("h2", 6379), ("::1", 7002)]
    assert (cu.username, cu.password, cu.ssl, cu.options) == (None, None, False, {})
    cu = parse_cluster_url("rediss+cluster://u:p%40ss@h1:1/?ssl_ca_certs=/ca.pem"
                           "&socket_timeout=0.5&ssl_check_hostname=false")
    assert (cu.nodes, cu.username, cu.password, cu.ssl) == ([("h1", 1)], "u", "p@ss", True)
    assert cu.options == {"ssl_ca_certs": "/ca.pem", "socket_timeout": 0.5,
                          "ssl_check_hostname": False}
    assert parse_cluster_url("redis+cluster://:pw@h1:1/0").password == "pw"
    for bad in ("redis+cluster://", "redis+cluster:///", "redis+cluster://h:x",
                "redis+cluster://h:1/1", "redis+cluster://h:1/?db=1",
                "redis+cluster://h:1?socket_timeout=soon", "redis://h:1",
                "redis+sentinel://h:1/m"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)
    assert redact_url("redis+cluster://u:pw@a:1,b:2/") == "redis+cluster://u:***@a:1,b:2/"
    assert redact_url("rediss+cluster://:pw@a:1") == "rediss+cluster://:***@a:1"
    with pytest.raises(ValueError, match="only db 0") as info:
        RedisStore("redis+cluster://:hunter2@a:1/3")
    assert "hunter2" not in str(info.value)


async def test_unreachable_cluster_is_store_unavailable_and_the_source_survives():
    url = f"redis+cluster://:hunter2@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/"
    async with RedisStore(url, socket_timeout=0.5) as store:
        for call in (store.head(), store.read(), store.push(example_graph()),
                     store.delta_records(0)):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert "hunter2" not in str(info.value) and info.value.status == 503
        async with running_source(store, wait=0.5, poll_interval=0.1,
                                  ping_timeout=0.5) as (cell, source):
            assert cell.current is None and not cell.source_connected
            assert await wait_until(lambda: source.errors_total >= 2, 5), source
            assert not source.pubsub_subscribed


@needs_redis
async def test_discovery_through_any_reachable_node(redis_cluster):
    nodes = redis_cluster
    async with RedisStore(_url(nodes), socket_timeout=1.0) as store:
        v1 = await store.push(example_graph())
        _slot, owner = _slot_and_owner(nodes, store)
    # the URL names a dead port first and then one node that does not own the slot
    other = next(n for n in nodes if n is not owner)
    async with RedisStore(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{other.port}",
                          socket_timeout=1.0) as store:
        assert (await store.read())[0] == v1
        assert await store.push(example_graph(), expect_version=v1) == v1 + 1
    # a plain redis:// URL naming that node gets MOVED: StoreUnavailable, not a wrong answer
    async with RedisStore(f"redis://127.0.0.1:{other.port}/0", socket_timeout=1.0) as plain:
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{owner.port}"):  # MOVED there
            await plain.head()


@needs_redis
async def test_resharding_moves_the_graph_slot(redis_cluster):
    nodes = redis_cluster
    async with RedisStore(_url(nodes), socket_timeout=1.0) as store:
        doc = example_graph()
        v1 = await store.push(doc)
        slot, src = _slot_and_owner(nodes, store)
        async with running_source(store, poll_interval=30, ping_interval=0.5) as (cell, source):
            assert cell.version == v1
            assert await wait_until(lambda: source.pubsub_subscribed, 5), source
            dst = next(n for n in nodes if n is not src)
            await asyncio.to_thread(_migrate_slot, nodes, slot, src, dst)
            assert _slot_and_owner(nodes, store)[1] is dst

            # the store follows MOVED: reads and the push go to the new owner, no error
            assert (await store.head())[0] == v1
            doc["envs"]["baseline"]["config"]["n"] = 2
            v2 = await store.push(doc)
            assert v2 == v1 + 1
            with dst.client() as c:
                assert c.get(store.version_key) == str(v2).encode()
            # the subscriber (on the old owner) still hears it: PUBLISH reaches every node
            assert await cell.wait_for(v2, 5), source
            assert cell.current.graph.envs["baseline"].config["n"] == 2
            await asyncio.sleep(1.2)  # pings keep being answered
            assert (source.full_loads, source.delta_loads) == (1, 1), source
            assert (source.errors_total, source.pubsub_reconnects) == (0, 0), source


@needs_redis
async def test_slot_master_dies_and_returns_empty(redis_cluster):
    nodes = redis_cluster
    async with RedisStore(_url(nodes), socket_timeout=0.5) as store:
        v1 = await store.push(example_graph())
        _slot, owner = _slot_and_owner(nodes, store)
        async with running_source(store, poll_interval=0.1, ping_interval=0.5,
                                  ping_timeout=0.5) as (cell, source):
            assert cell.version == v1
            assert await wait_until(lambda: source.pubsub_subscribed, 5), source
            old_epoch = cell.current.graph.epoch
            await asyncio.to_thread(owner.stop)  # SIGKILL; no replica to take over
            with pytest.raises(StoreUnavailable):
                await store.push(example_graph())
            assert await wait_until(lambda: not cell.source_connected, 5), source
            assert cell.version == v1  # the last good graph keeps serving

            await asyncio.to_thread(owner.start)  # same port and node id, no data
            v = await push_until(store, example_graph(), 20)  # until the cluster takes it back
            assert v == 1  # an empty store starts a new lineage (epoch) ...
            assert await wait_until(  # ... which the source adopts at once
                lambda: cell.current.graph.epoch != old_epoch, 10), source
            assert cell.version == 1 and cell.source_connected
            assert await wait_until(lambda: source.pubsub_subscribed, 10), source
            assert source.pubsub_reconnects >= 1


@needs_redis
async def test_tls_cluster_with_password(tmp_path):
    ca_file, cert_file, key_file = tls_files(tmp_path)
    nodes: list[RedisServer] = []
    tls_ports: list[int] = []
    try:
        for i in range(3):
            d = tmp_path / f"node{i}"
            d.mkdir()
            port, tls_port = free_port(), topologies._free_port_with_bus()  # bus: tls + 10000
            node = RedisServer(str(d), port, password="s3cret", extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000", "--masterauth", "s3cret",
                "--tls-port", str(tls_port), "--tls-cluster", "yes",  # bus and CLUSTER SLOTS
                "--tls-cert-file", cert_file, "--tls-key-file", key_file,
                "--tls-ca-cert-file", ca_file, "--tls-auth-clients", "no"))
            node.start()
            nodes.append(node)
            tls_ports.append(tls_port)
        out = await asyncio.to_thread(subprocess.run, [
            REDIS_CLI, "--no-auth-warning", "-a", "s3cret", "--cluster", "create",
            *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
            "--cluster-yes"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        hosts = ",".join(f"127.0.0.1:{p}" for p in tls_ports)
        async with RedisStore(f"rediss+cluster://:s3cret@{hosts}/?ssl_ca_certs={ca_file}",
                              socket_timeout=1.0) as store:
            v1 = await push_until(store, example_graph(), 15)  # until the nodes agree on slots
            # every node was reached over TLS: the cluster announces the TLS ports
            assert {n.port for n in store._client.get_nodes()} == set(tls_ports)
            async with running_source(store, poll_interval=30) as (cell, source):
                assert cell.version == v1
                assert await wait_until(lambda: source.pubsub_subscribed, 5), source
                v2 = await store.push(example_graph())
                assert await cell.wait_for(v2, 5), source  # through pub/sub, over TLS
        async with RedisStore(f"rediss+cluster://:wrong@{hosts}?ssl_ca_certs={ca_file}",
                              socket_timeout=1.0) as wrong:
            with pytest.raises(StoreUnavailable) as info:
                await wrong.head()
            assert "wrong" not in str(info.value)
    finally:
        for n in nodes:
            n.stop()
