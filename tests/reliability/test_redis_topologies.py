"""Scale-out against real Redis topologies, with real redis-server processes on free ports.

- Sentinel: a primary, a replica and three sentinels. A gateway syncs its graph through a
  `redis+sentinel://` URL while requests flow through it; the primary is SIGKILLed (or handed
  over with SENTINEL FAILOVER). No proxied request fails (the data plane never waits on
  Redis), and a graph pushed through the same URL afterwards reaches the gateway from the
  promoted replica.
- Cluster: three masters. Every key of the graph hashes to one slot (the `{graph}` tag), and
  push, sync and resolution work through a cluster URL.

Every process is started by a fixture and SIGKILLed by its finalizer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import aiohttp
import pytest
import redis

from resolver.sources.redis_store import RedisStore
from resolver.sources.redis_sync import RedisSource
from resolver.sync import SnapshotCell
from tests.redis_fixture import RedisServer, free_port, push_until, wait_until
from tests.servers import port_of

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MASTER = "mymaster"

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server and redis-cli are needed (Debian/Ubuntu: apt-get install redis-server)")


def _poll(predicate, timeout: float, what: str, step: float = 0.05) -> None:
    """Synchronous bounded wait, for fixtures (no event loop there)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError as exc:
            last = exc
        time.sleep(step)
    raise TimeoutError(f"{what} within {timeout}s" + (f" (last error: {last})" if last else ""))


async def _until(predicate, timeout: float, what: str, step: float = 0.05) -> None:
    """Bounded wait from a test: the predicate runs in a thread (it may block on Redis), so
    the in-process gateway sharing this loop keeps serving."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(predicate):
                return
        except redis.RedisError as exc:
            last = exc
        await asyncio.sleep(step)
    raise AssertionError(f"{what} within {timeout}s" + (f" (last error: {last})" if last else ""))


# == Sentinel ==================================================================================
class SentinelProcess:
    """`redis-server sentinel.conf --sentinel`, monitoring one primary."""

    def __init__(self, directory: str, master_port: int) -> None:
        self.dir = directory
        self.port = free_port()
        self.conf = os.path.join(directory, "sentinel.conf")
        with open(self.conf, "w") as f:  # sentinel rewrites this file: it must be writable
            f.write(f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {directory}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} 1000\n"
                    f"sentinel failover-timeout {MASTER} 5000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(os.path.join(self.dir, "sentinel.log"), "ab") as log:
            self.proc = subprocess.Popen([REDIS_SERVER, self.conf, "--sentinel"], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir)
        _poll(lambda: self.client().ping(), 10, f"sentinel on {self.port} answering PING")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2, decode_responses=True)

    def master_port(self) -> int | None:
        with self.client() as c:
            addr = c.sentinel_get_master_addr_by_name(MASTER)
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


class SentinelTopology:
    def __init__(self, root: str) -> None:
        os.makedirs(os.path.join(root, "primary"))
        os.makedirs(os.path.join(root, "replica"))
        # no 5 s wait for more replicas before a diskless full sync (either may be primary)
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.primary = RedisServer(os.path.join(root, "primary"), extra_args=fast_sync)
        self.replica = RedisServer(os.path.join(root, "replica"), extra_args=(
            *fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinels: list[SentinelProcess] = []
        for i in range(3):
            d = os.path.join(root, f"sentinel{i}")
            os.makedirs(d)
            self.sentinels.append(SentinelProcess(d, self.primary.port))
        self.url = "redis+sentinel://" + ",".join(
            f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        _poll(lambda: _info(self.replica, "replication").get("master_link_status") == "up", 10,
              "replica linked to the primary")
        for s in self.sentinels:
            s.start()

        def settled() -> bool:  # failover needs every sentinel to know the others and the replica
            for s in self.sentinels:
                with s.client() as c:
                    state = c.sentinel_master(MASTER)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            return True

        _poll(settled, 15, "sentinels discovering each other and the replica", step=0.1)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.primary.stop()


def _info(server: RedisServer, section: str) -> dict:
    with server.client() as c:
        return c.info(section)


@pytest.fixture
def sentinel_topology(tmp_path) -> Iterator[SentinelTopology]:
    topo = SentinelTopology(str(tmp_path))
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


def _graph(up: dict, **extra_envs) -> dict:
    return {
        "baseline": "baseline",
        "envs": {
            "baseline": {"services": {"web": [up["web"].addr], "orders": [up["orders"].addr]}},
            "team-a": {"parent": "baseline", "services": {"orders": [up["orders-a"].addr]}},
            "feature-1": {"parent": "team-a"},
            **extra_envs,
        },
    }


class Load:
    """Requests in a loop through the gateway (and /readyz on its admin port) until stopped."""

    def __init__(self, gateway_port: int, admin_port: int) -> None:
        self.base = f"http://127.0.0.1:{gateway_port}/"
        self.readyz = f"http://127.0.0.1:{admin_port}/readyz"
        self.results: list[tuple[str, object]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _loop(self, url: str, headers: dict, label: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not self._stop.is_set():
                try:
                    async with s.get(url, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                        self.results.append((label, r.status))
                except Exception as exc:  # a failed request is what the test looks for
                    self.results.append((label, repr(exc)))
                await asyncio.sleep(0.005)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(self.base, {"Host": "web"}, "web")),
            loop.create_task(self._loop(self.base, {"Host": "orders", "x-stax-env": "feature-1"},
                                        "orders@feature-1")),
            loop.create_task(self._loop(self.readyz, {}, "readyz")),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def count(self, label: str) -> int:
        return sum(1 for lbl, _ in self.results if lbl == label)


@pytest.mark.parametrize("how", ["sigkill", "sentinel-failover"])
async def test_sentinel_failover_under_load(sentinel_topology, upstreams, proxies, how):
    topo = sentinel_topology
    names = ["web", "orders", "orders-a", "web-new"]
    up = dict(zip(names, await upstreams(*names), strict=True))
    async with RedisStore(topo.url, socket_timeout=1.0) as store:
        v1 = await store.push(_graph(up))
        def replicated() -> bool:
            with topo.replica.client() as c:
                return c.get(store.version_key) == str(v1).encode()

        await _until(replicated, 10, "the replica holding the pushed version")
        rt = await proxies("gateway", redis=topo.url)
        assert rt.cell.version == v1 and rt.cell.source_connected
        load = Load(port_of(rt, "gateway"), rt.admin_port)
        load.start()
        await asyncio.sleep(0.3)  # traffic before the fault

        if how == "sigkill":
            await asyncio.to_thread(topo.primary.stop)  # SIGKILL: connections just die
        else:
            with topo.sentinels[0].client() as c:
                await asyncio.to_thread(c.execute_command, "SENTINEL", "FAILOVER", MASTER)
        await _until(lambda: all(s.master_port() == topo.replica.port for s in topo.sentinels),
                     20, "every sentinel naming the replica as the new primary")
        await _until(lambda: _info(topo.replica, "replication")["role"] == "master", 5,
                     "the replica promoted")

        # a new graph through the same sentinel URL lands on the new primary ...
        v2 = await push_until(store, _graph(up, **{
            "after-failover": {"parent": "baseline", "services": {"web": [up["web-new"].addr]}}}),
            timeout=15)
        assert v2 == v1 + 1
        # ... and the gateway, which was syncing from the old one, resyncs to it
        assert await rt.cell.wait_for(v2, 10), rt.source
        assert rt.cell.source_connected
        await asyncio.sleep(0.3)  # traffic after the resync
        await load.stop()

    assert load.failures() == [], f"{len(load.failures())} failed: {load.failures()[:5]}"
    assert load.count("web") > 50 and load.count("orders@feature-1") > 50, load.count("web")
    # each request reached its provider exactly once: nothing failed over to a retry
    assert len(up["web"].seen) == load.count("web")
    assert len(up["orders-a"].seen) == load.count("orders@feature-1")  # the ancestor's
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port_of(rt, 'gateway')}/",
                         headers={"Host": "web", "x-stax-env": "after-failover"}) as r:
            assert r.status == 200 and r.headers["x-upstream"] == "web-new"
            assert r.headers["x-stax-route"] == f"web=local:after-failover@v{v2}"


# == Cluster ===================================================================================
def _free_port_with_bus() -> int:
    """A free port P whose cluster bus port P+10000 is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def redis_cluster(tmp_path) -> Iterator[list[RedisServer]]:
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            d = tmp_path / f"node{i}"
            d.mkdir()
            port = _free_port_with_bus()
            node = RedisServer(str(d), port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000"))
            node.start()
            nodes.append(node)
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr

        def ok() -> bool:
            for n in nodes:
                with n.client() as c:
                    info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                    return False
            return True

        _poll(ok, 15, "cluster_state:ok on every node")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


async def test_cluster_push_sync_and_resolve(redis_cluster, upstreams, proxies):
    nodes = redis_cluster
    names = ["web", "orders", "orders-a", "web-f1"]
    up = dict(zip(names, await upstreams(*names), strict=True))

    # every key of one graph hashes to one slot: the Lua push may touch them all
    naming = RedisStore("redis://127.0.0.1:1/0")  # key names only; redis-py connects lazily
    keys = [naming.doc_key, naming.version_key, naming.epoch_key, naming.deltas_key,
            naming.audit_key]
    await naming.close()
    with nodes[0].client() as c:
        slots = {c.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}
    assert len(slots) == 1, slots
    (slot,) = slots

    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    async with RedisStore(url, socket_timeout=1.0) as store:
        v1 = await store.push(_graph(up))
        version, epoch, doc = await store.read()
        assert version == v1 and epoch and doc["baseline"] == "baseline"
        owners = []
        for n in nodes:
            with n.client() as c:
                if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot):
                    owners.append(n.port)
        assert len(owners) == 1, owners  # the graph lives on the node that owns the slot

        cell = SnapshotCell()
        # a poll interval far longer than the waits: only pub/sub can deliver v2 in time
        source = RedisSource(store, cell, poll_interval=30, ping_interval=0.5)
        await source.start(wait=5)
        try:
            assert cell.version == v1 and cell.source_connected
            assert await wait_until(lambda: source.pubsub_subscribed, 5), source
            await asyncio.sleep(1.2)  # a few ping/pong rounds on the cluster subscription
            assert source.pubsub_subscribed and source.pubsub_reconnects == 0, source
            v2 = await store.push(_graph(up, **{
                "feature-2": {"parent": "feature-1", "services": {"web": [up["web-f1"].addr]}}}))
            assert await cell.wait_for(v2, 5), source
            assert source.messages_total >= 1  # the script's PUBLISH reached the subscriber
            # one full load at start, then v2 through the delta stream; never an error
            assert (source.full_loads, source.delta_loads, source.errors_total) == (1, 1, 0)
            info = cell.current.explain("feature-2", "orders")
            assert (info["kind"], info["provider_env"]) == ("ancestor", "team-a")
            assert info["graph_version"] == v2
        finally:
            await source.stop()

        rt = await proxies("gateway", redis=url)
        assert rt.cell.version == v2
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{port_of(rt, 'gateway')}/"
            for env, service, upstream, route in (
                    ("feature-2", "web", "web-f1", f"web=local:feature-2@v{v2}"),
                    ("feature-2", "orders", "orders-a", f"orders=ancestor:team-a@v{v2}"),
                    ("baseline", "orders", "orders", f"orders=local:baseline@v{v2}")):
                async with s.get(base, headers={"Host": service, "x-stax-env": env}) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["x-upstream"] == upstream
                    assert r.headers["x-stax-route"] == route
