"""RedisStore and RedisSource against a real redis-server: the write path, reads, deltas,
pub/sub, and the promise that the delta path and the full-load path build the same snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import subprocess

import orjson
import pytest

from resolver.errors import GraphInvalid, StoreUnavailable, VersionConflict
from resolver.sources import redis_store
from resolver.sources.delta import apply_delta
from resolver.sources.redis_store import RedisStore, parse_sentinel_url, redact_url
from resolver.sources.redis_sync import RedisSource
from resolver.sync import SnapshotCell
from resolver.validate import parse_graph
from tests.redis_fixture import (
    REDIS_SERVER,
    RedisServer,
    example_graph,
    free_port,
    push_until,
    running_source,
    tls_files,
    wait_until,
)


@pytest.fixture
async def store(redis_server):
    s = RedisStore(redis_server.url)
    yield s
    await s.close()


def canonical(doc: dict) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def full_graph_doc(version: int, epoch: str, doc: dict) -> dict:
    """What a fresh full load of the store must serve."""
    return parse_graph({**doc, "epoch": epoch}, version=version).to_doc()


def variations(doc: dict) -> list[dict]:
    """A series of graphs, each a small change of the one before: envs added, changed and
    removed, shared services changed, config changed, a new baseline."""
    out = []
    d = copy.deepcopy(doc)
    d["envs"]["team-b"] = {"parent": "baseline", "services": {"web": ["127.0.0.1:7401"]}}
    out.append(copy.deepcopy(d))
    d["envs"]["team-a"]["services"]["payments"] = {"endpoints": [
        {"address": "127.0.0.1:7501", "weight": 3, "region": "eu"}, "127.0.0.1:7502"]}
    out.append(copy.deepcopy(d))
    del d["envs"]["feature-1"]
    d["shared"]["auth"] = {"endpoints": ["127.0.0.1:7002"]}
    out.append(copy.deepcopy(d))
    d["shared"]["search"] = {"endpoints": ["https://127.0.0.1:7600"]}
    d["envs"]["team-a"]["config"]["orders.retries"] = 3
    d["envs"]["team-b"]["private"] = True
    out.append(copy.deepcopy(d))
    d["envs"]["root"] = {"services": {"web": ["127.0.0.1:7000"]}}  # a new baseline above
    d["envs"]["baseline"]["parent"] = "root"
    d["baseline"] = "root"
    out.append(copy.deepcopy(d))
    d["envs"]["feature-2"] = {"parent": "team-b", "services": {"orders": ["127.0.0.1:7701"]}}
    out.append(copy.deepcopy(d))
    return out


# -- the write path and reads --------------------------------------------------------------
async def test_push_then_read(store, redis_server):
    assert await store.version() == 0
    assert await store.epoch() == ""
    assert await store.read() == (0, "", None)

    doc = example_graph()
    doc["version"] = 41  # the store owns the version: ignored, not stored
    assert await store.push(doc) == 1
    version, epoch, stored = await store.read()
    assert version == 1 and len(epoch) == 16 and int(epoch, 16) >= 0
    assert "version" not in stored and "epoch" not in stored
    assert stored == {k: v for k, v in doc.items() if k != "version"}
    assert await store.version() == 1 and await store.epoch() == epoch

    doc["envs"]["team-b"] = {"parent": "baseline", "services": {}}
    assert await store.push(doc, expect_version=1) == 2
    version2, epoch2, stored2 = await store.read()
    assert (version2, epoch2) == (2, epoch)  # the epoch is made once
    assert "team-b" in stored2["envs"]

    raw = redis_server.client()
    assert orjson.loads(raw.get("stax:{graph}:doc")) == stored2
    assert raw.get("stax:{graph}:version") == b"2"


async def test_keys_share_one_hash_tag_and_prefix(redis_server):
    async with RedisStore(redis_server.url, prefix="team1:") as store:
        await store.push(example_graph(), audit={"who": "t"})
        keys = sorted(k.decode() for k in redis_server.client().keys("*"))
        assert keys == ["team1:{graph}:audit", "team1:{graph}:deltas", "team1:{graph}:doc",
                        "team1:{graph}:epoch", "team1:{graph}:version"]
        assert store.channel == "team1:{graph}:changes"
        assert await RedisStore(redis_server.url).version() == 0  # other prefix: other graph


async def test_invalid_graph_rejected_with_every_reason_store_unchanged(store, redis_server):
    await store.push(example_graph())
    before = await store.read()
    stream_len = redis_server.client().xlen("stax:{graph}:deltas")

    bad = example_graph()
    bad["envs"]["team-a"]["parent"] = "nowhere"  # missing parent
    bad["envs"]["team-a"]["services"]["auth"] = ["127.0.0.1:1"]  # overlays a shared service
    bad["envs"]["feature-1"]["services"]["web"] = ["not an endpoint"]  # malformed endpoint
    bad["envs"]["Bad_Name"] = {"parent": "baseline"}  # bad env name
    with pytest.raises(GraphInvalid) as info:
        await store.push(bad)
    problems = info.value.problems
    assert any("missing parent 'nowhere'" in p for p in problems)
    assert any("auth is shared and cannot be overlaid" in p for p in problems)
    assert any("malformed endpoint 'not an endpoint'" in p for p in problems)
    assert any("bad env name 'Bad_Name'" in p for p in problems)
    assert len(problems) >= 4

    with pytest.raises(GraphInvalid):
        await store.push({"envs": "nope"}, expect_version=1)
    with pytest.raises(GraphInvalid):
        await store.push([1, 2])  # type: ignore[arg-type]

    assert await store.read() == before
    assert redis_server.client().xlen("stax:{graph}:deltas") == stream_len


async def test_racing_writers_exactly_one_wins(redis_server):
    stores = [RedisStore(redis_server.url) for _ in range(6)]
    try:
        await stores[0].push(example_graph())
        for round_ in range(5):
            expected = round_ + 1
            docs = []
            for i in range(len(stores)):
                d = example_graph()
                d["envs"][f"writer-{i}"] = {"parent": "baseline"}
                docs.append(d)
            results = await asyncio.gather(
                *(s.push(d, expect_version=expected) for s, d in zip(stores, docs, strict=True)),
                return_exceptions=True)
            wins = [r for r in results if isinstance(r, int)]
            losses = [r for r in results if isinstance(r, VersionConflict)]
            assert wins == [expected + 1], results
            assert len(losses) == len(stores) - 1, results
            for exc in losses:
                assert (exc.expected, exc.actual) == (expected, expected + 1)
                assert f"expected {expected}, store has {expected + 1}" in str(exc)
        assert await stores[0].version() == 6
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_unconditional_pushes_all_land_with_a_consistent_delta_chain(redis_server):
    stores = [RedisStore(redis_server.url) for _ in range(4)]
    try:
        first = example_graph()
        await stores[0].push(first)
        docs = []
        for i in range(12):
            d = example_graph()
            d["envs"][f"e{i}"] = {"parent": "team-a", "services": {"web": [f"127.0.0.1:{8000 + i}"]}}
            docs.append(d)
        versions = await asyncio.gather(*(stores[i % 4].push(d) for i, d in enumerate(docs)))
        assert sorted(versions) == list(range(2, 14))
        # Each delta was computed against the document actually replaced, so the chain
        # rebuilds the final document exactly.
        deltas = await stores[0].deltas_since(1)
        assert [v for v, _ in deltas] == list(range(2, 14))
        rebuilt = {k: v for k, v in first.items()}
        for _, delta in deltas:
            rebuilt = apply_delta(rebuilt, delta)
        _, _, final = await stores[0].read()
        assert canonical(rebuilt) == canonical(final)
    finally:
        for s in stores:
            await s.close()


async def test_deltas_since(store, redis_server):
    docs = [example_graph(), *variations(example_graph())[:3]]
    for d in docs:
        await store.push(d)
    assert await store.deltas_since(4) == []
    deltas = await store.deltas_since(1)
    assert [v for v, _ in deltas] == [2, 3, 4]
    assert deltas[0][1] == {"envs": {"set": {"team-b": docs[1]["envs"]["team-b"]}}}
    rebuilt = docs[0]
    for _, delta in deltas:
        rebuilt = apply_delta(rebuilt, delta)
    assert rebuilt == (await store.read())[2]
    assert await store.deltas_since(9) is None  # ahead of the store: no way back by deltas

    redis_server.client().xtrim("stax:{graph}:deltas", maxlen=2, approximate=False)
    assert await store.deltas_since(1) is None  # trimmed past version 2
    assert [v for v, _ in await store.deltas_since(2)] == [3, 4]


async def test_delta_stream_is_capped_and_holds_no_full_document(store, redis_server,
                                                                 monkeypatch):
    await store.push(example_graph())
    raw = redis_server.client()
    (_, fields), = raw.xrange("stax:{graph}:deltas")
    assert set(fields) == {b"version", b"delta", b"base", b"digest"}
    assert redis_store.DELTA_STREAM_MAXLEN == 1000
    # MAXLEN ~ trims whole stream nodes (100 entries): with a cap of 10, 250 pushes leave
    # far fewer than 250 records, and the oldest versions are gone.
    monkeypatch.setattr(redis_store, "DELTA_STREAM_MAXLEN", 10)
    doc = example_graph()
    for i in range(250):
        doc["envs"]["baseline"]["config"]["n"] = i
        await store.push(doc)
    assert raw.xlen("stax:{graph}:deltas") < 200
    assert await store.deltas_since(1) is None
    assert [v for v, _ in await store.deltas_since(249)] == [250, 251]


async def test_audit_record_and_publish(store, redis_server):
    pubsub = store.pubsub()
    await pubsub.subscribe(store.channel)
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
    v = await store.push(example_graph(), audit={"actor": "alice", "action": "env.create"})
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert msg is not None and msg["data"] == str(v).encode()
    await pubsub.aclose()

    (_, fields), = redis_server.client().xrange("stax:{graph}:audit")
    assert fields[b"version"] == b"1"
    assert fields[b"epoch"].decode() == await store.epoch()
    assert orjson.loads(fields[b"record"]) == {"actor": "alice", "action": "env.create"}
    await store.push(example_graph())  # no audit given: no audit record
    assert redis_server.client().xlen("stax:{graph}:audit") == 1


async def test_unreachable_store_is_store_unavailable_naming_url_without_password():
    port = free_port()
    async with RedisStore(f"redis://:hunter2@127.0.0.1:{port}/0", socket_timeout=0.5) as store:
        for call in (store.version(), store.read(), store.push(example_graph()),
                     store.deltas_since(0)):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert f"127.0.0.1:{port}" in str(info.value)
            assert "hunter2" not in str(info.value)
            assert info.value.status == 503


def test_url_helpers():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert redact_url("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("redis+sentinel://:pw@a:1,b:2/m/0?sentinel_password=x") == \
        "redis+sentinel://:***@a:1,b:2/m/0?sentinel_password=***"
    su = parse_sentinel_url("redis+sentinel://u:p%40ss@h1:26379,h2,[::1]:26380/mymaster/3"
                            "?sentinel_password=sp")
    assert su.sentinels == [("h1", 26379), ("h2", 26379), ("::1", 26380)]
    assert (su.service, su.db, su.username, su.password, su.sentinel_password, su.ssl) == \
        ("mymaster", 3, "u", "p@ss", "sp", False)
    su = parse_sentinel_url("rediss+sentinel://h1:1/m")
    assert (su.service, su.db, su.password, su.ssl) == ("m", 0, None, True)
    for bad in ("redis+sentinel://h1:1/", "redis+sentinel:///m", "redis+sentinel://h:x/m",
                "redis+sentinel://h:1/m/notadb", "redis://h:1/m"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
    with pytest.raises(ValueError, match="unsupported Redis URL"):
        RedisStore("http://:secret@h:1")


async def test_password_and_tls(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    ca_file, cert_file, key_file = tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(str(tmp_path), password="s3cret", extra_args=(
        "--tls-port", str(tls_port), "--tls-cert-file", cert_file, "--tls-key-file", key_file,
        "--tls-ca-cert-file", ca_file, "--tls-auth-clients", "no"))
    server.start()
    try:
        async with RedisStore(f"rediss://:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}") as store:
            assert await store.push(example_graph()) == 1
            assert (await store.read())[0] == 1
            async with running_source(store, poll_interval=0.1) as (cell, _source):
                assert cell.version == 1 and cell.source_connected
        async with RedisStore(f"redis://:wrong@127.0.0.1:{server.port}/0") as wrong:
            with pytest.raises(StoreUnavailable) as info:
                await wrong.version()
            assert "wrong" not in str(info.value)
    finally:
        server.stop()


async def test_sentinel_url_against_real_sentinel(redis_server, tmp_path):
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=str(tmp_path))
    store = RedisStore(f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{port}/mymaster/0")
    try:
        # the sentinel takes a moment to listen and to see its master
        v = await push_until(store, example_graph(), 10, step=0.05)
        assert v == 1 and redis_server.client().get("stax:{graph}:version") == b"1"
        async with running_source(store, poll_interval=30) as (cell, _source):
            assert cell.version == 1
            await store.push(example_graph())
            assert await cell.wait_for(2, 5)
    finally:
        await store.close()
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(conf)


# -- RedisSource ---------------------------------------------------------------------------
async def test_subscriber_sees_a_push_through_pubsub(store):
    await store.push(example_graph())
    # A poll interval far longer than the wait: only the pub/sub message can deliver it.
    async with running_source(store, poll_interval=60) as (cell, source):
        assert cell.version == 1 and cell.source_connected
        assert await wait_until(lambda: source.pubsub_subscribed, 5)
        assert cell.current.source == f"redis:{store.safe_url}"
        doc = example_graph()
        doc["envs"]["team-b"] = {"parent": "baseline"}
        v = await store.push(doc)
        assert await cell.wait_for(v, timeout=5)
        assert "team-b" in cell.current.graph.envs
        assert source.messages_total >= 1


async def test_delta_path_and_full_path_build_identical_snapshots(store):
    await store.push(example_graph())
    async with running_source(store, poll_interval=0.1) as (by_delta, delta_src), \
            running_source(store, poll_interval=0.1, max_delta_gap=0) as (by_full, full_src):
        docs = variations(example_graph())
        for doc in docs[:3]:  # one version at a time
            v = await store.push(doc)
            assert await by_delta.wait_for(v, 5) and await by_full.wait_for(v, 5)
            assert by_delta.current.graph.to_doc() == by_full.current.graph.to_doc()
        for doc in docs[3:]:  # several versions at once: several deltas in one catch-up
            v = await store.push(doc)
        assert await by_delta.wait_for(v, 5) and await by_full.wait_for(v, 5)
        version, epoch, stored = await store.read()
        want = canonical(full_graph_doc(version, epoch, stored))
        assert canonical(by_delta.current.graph.to_doc()) == want
        assert canonical(by_full.current.graph.to_doc()) == want
        assert by_delta.current.graph.baseline == "root"
        assert delta_src.full_loads == 1 and delta_src.delta_loads >= 3
        assert full_src.delta_loads == 0 and full_src.full_loads >= 4


async def test_too_far_behind_or_trimmed_stream_falls_back_to_full_load(store, redis_server):
    cell = SnapshotCell()
    source = RedisSource(store, cell, max_delta_gap=3)  # driven by hand: check() is one poll
    docs = [example_graph(), *variations(example_graph())]

    async def assert_serving_store_graph():
        version, epoch, stored = await store.read()
        assert cell.version == version
        assert canonical(cell.current.graph.to_doc()) == \
            canonical(full_graph_doc(version, epoch, stored))

    await store.push(docs[0])
    assert await source.check()
    assert (source.full_loads, source.delta_loads) == (1, 0)

    for d in docs[1:3]:
        await store.push(d)
    assert await source.check()  # 2 behind: deltas
    assert (source.full_loads, source.delta_loads) == (1, 1)
    await assert_serving_store_graph()

    for d in docs[3:7]:
        await store.push(d)
    assert await source.check()  # 4 behind > max_delta_gap: full load
    assert (source.full_loads, source.delta_loads) == (2, 1)
    await assert_serving_store_graph()

    await store.push(docs[1])
    await store.push(docs[2])
    redis_server.client().xtrim("stax:{graph}:deltas", maxlen=1, approximate=False)
    assert await store.deltas_since(cell.version) is None
    assert await source.check()  # 2 behind but the stream was trimmed: full load
    assert (source.full_loads, source.delta_loads) == (3, 1)
    await assert_serving_store_graph()

    await store.push(docs[3])
    assert await source.check()
    assert (source.full_loads, source.delta_loads) == (3, 2)
    await assert_serving_store_graph()
    assert await source.check()  # nothing new: no load
    assert (source.full_loads, source.delta_loads) == (3, 2)
    assert cell.rejected_total == 0 and cell.sync_errors_total == 0


async def test_cache_file_written_after_each_publish(store, tmp_path):
    cache = str(tmp_path / "graph-cache.json")
    await store.push(example_graph())
    async with running_source(store, poll_interval=0.1, cache_file=cache) as (cell, _):
        assert await wait_until(lambda: os.path.exists(cache), 5)
        doc = example_graph()
        doc["envs"]["team-b"] = {"parent": "baseline"}
        v = await store.push(doc)
        assert await cell.wait_for(v, 5)

        def cached_version():
            with open(cache, "rb") as f:
                return orjson.loads(f.read())["version"]
        assert await wait_until(lambda: cached_version() == v, 5)
        with open(cache, "rb") as f:
            cached = orjson.loads(f.read())
        assert parse_graph(cached).to_doc() == cell.current.graph.to_doc()
