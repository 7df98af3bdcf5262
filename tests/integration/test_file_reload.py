"""A big graph file changes: decoded and diffed in the helper process, applied here as a delta.
Real files, a real helper process (killed for real in the fault test)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal

import orjson
import pytest
import yaml

from resolver.sources.file import FileSource
from resolver.sync import SnapshotCell
from resolver.validate import parse_graph


def big_doc(n: int = 200) -> dict:
    envs = {"base": {"services": {f"s{i}": {"endpoints": [f"h{i}:80"]} for i in range(8)}}}
    for i in range(n):
        envs[f"e{i}"] = {"parent": "base" if i < 10 else f"e{i % 10}",
                         "services": {f"s{i % 8}": {"endpoints": [f"x{i}:81"]}}}
    return {"baseline": "base", "envs": envs}


def write(path, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@pytest.fixture
async def source(tmp_path):
    path = tmp_path / "graph.json"
    doc = big_doc()
    write(path, orjson.dumps(doc))
    cell = SnapshotCell()
    src = FileSource(str(path), cell, interval=0.05, helper_min_bytes=0)
    src.load_initial()
    src.start()
    await asyncio.wait_for(asyncio.wrap_future(src.helper_ready), 30)  # the base is decoded
    yield src, cell, path, doc
    await src.stop()


async def change(src, cell, path, doc: dict, i: int) -> dict:
    doc = copy.deepcopy(doc)
    doc["envs"][f"e{i}"]["services"] = {"s7": {"endpoints": [f"moved{i}:9"]}}
    version = cell.version
    write(path, orjson.dumps(doc))
    assert await cell.wait_for(version + 1, 20), "the change was not applied"
    assert cell.current.graph == parse_graph(doc, version=version + 1)
    return doc


async def test_big_file_changes_arrive_as_deltas(source):
    src, cell, path, doc = source
    first = cell.current
    for i in range(3):
        doc = await change(src, cell, path, doc, 20 + i)
    assert src.helper_deltas == 3
    assert src.helper_spliced == 3  # one env each: found from the bytes, not decoded whole
    assert cell.current.graph.envs["e5"] is first.graph.envs["e5"]  # untouched: reused
    write(path, orjson.dumps(doc))  # same content, new inode: nothing to publish
    await asyncio.sleep(0.3)
    assert cell.version == 4 and cell.rejected_total == 0


async def test_a_change_in_two_places_is_decoded_whole_in_the_helper(source):
    src, cell, path, doc = source
    doc = copy.deepcopy(doc)
    doc["epoch"] = "two"  # a top-level key at the end and an env at the start: no one section
    doc["envs"]["e0"]["services"] = {"s3": {"endpoints": ["far:1"]}}
    version = cell.version
    write(path, orjson.dumps(doc))
    assert await cell.wait_for(version + 1, 20), "the change was not applied"
    assert cell.current.graph == parse_graph(doc, version=version + 1)
    assert (src.helper_deltas, src.helper_spliced) == (1, 0)
    await change(src, cell, path, doc, 9)  # the base kept up: the next one-env change splices
    assert (src.helper_deltas, src.helper_spliced) == (2, 1)


async def test_a_big_yaml_file_changes_as_deltas_too(tmp_path):
    path = tmp_path / "graph.yaml"
    doc = big_doc()
    write(path, yaml.safe_dump(doc).encode())
    cell = SnapshotCell()
    src = FileSource(str(path), cell, interval=0.05, helper_min_bytes=0)
    src.load_initial()
    src.start()
    try:
        await asyncio.wait_for(asyncio.wrap_future(src.helper_ready), 30)
        doc["envs"]["e4"]["services"] = {"s1": {"endpoints": ["yaml:1"]}}
        write(path, yaml.safe_dump(doc).encode())
        assert await cell.wait_for(2, 20), "the change was not applied"
        assert cell.current.graph == parse_graph(doc, version=2)
        assert (src.helper_deltas, src.helper_spliced) == (1, 0)  # YAML: decoded, then diffed
    finally:
        await src.stop()


async def test_broken_big_file_is_rejected_whole_and_the_next_change_lands(source):
    src, cell, path, doc = source
    write(path, orjson.dumps(doc)[:-40])  # truncated JSON
    for _ in range(200):
        if cell.rejected_total:
            break
        await asyncio.sleep(0.05)
    assert cell.rejected_total == 1 and cell.version == 1
    assert "does not parse" in cell.last_error
    bad = copy.deepcopy(doc)
    bad["envs"]["e3"]["parent"] = "nowhere"  # decodes, but is not a valid graph
    write(path, orjson.dumps(bad))
    for _ in range(200):
        if cell.rejected_total == 2:
            break
        await asyncio.sleep(0.05)
    assert cell.rejected_total == 2 and cell.version == 1 and "nowhere" in cell.last_error
    await change(src, cell, path, doc, 7)  # decoded here ("full"), then deltas again
    assert cell.last_error == ""  # a newer graph landed: /readyz no longer shows the old error
    await change(src, cell, path, doc, 8)
    assert src.helper_deltas >= 1


async def test_killed_helper_is_replaced_and_changes_keep_landing(source):
    src, cell, path, doc = source
    doc = await change(src, cell, path, doc, 30)
    (pid,) = src.decoder.pids()
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    doc = await change(src, cell, path, doc, 31)  # decoded here while a new helper starts
    before = src.helper_deltas
    doc = await change(src, cell, path, doc, 32)
    doc = await change(src, cell, path, doc, 33)
    assert src.helper_deltas > before
    assert src.decoder.pids() and pid not in src.decoder.pids()


def test_helper_exits_when_the_proxy_is_killed(tmp_path):
    """A SIGKILLed proxy leaves no decoder process behind."""
    import subprocess
    import sys
    import time

    from loadtests.common import free_port, wait_port

    def alive(pid: int) -> bool:  # a zombie waiting for init to reap it has exited
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    path = tmp_path / "graph.json"
    write(path, orjson.dumps(big_doc(5000)))  # over the 256 KiB helper threshold
    assert path.stat().st_size > 256 * 1024
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "gateway", "--graph", str(path),
                             "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc, timeout=30)
        children: list[int] = []
        for _ in range(100):  # the helper starts right after the first load
            children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
            if any(b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read() for c in children):
                break
            time.sleep(0.1)
        helpers = [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert helpers, "no decoder helper process was started"
    finally:
        proc.kill()
        proc.wait()
    for _ in range(100):
        if not any(alive(c) for c in helpers):
            break
        time.sleep(0.1)
    assert not any(alive(c) for c in helpers), "the helper outlived the proxy"


async def test_a_file_that_grows_big_gets_the_helper(tmp_path):
    path = tmp_path / "graph.json"
    small = big_doc(5)
    write(path, orjson.dumps(small))
    cell = SnapshotCell()
    src = FileSource(str(path), cell, interval=0.05, helper_min_bytes=64 * 1024)
    src.load_initial()
    src.start()
    try:
        assert src.decoder is None
        doc = big_doc(2000)
        assert len(orjson.dumps(doc)) >= 64 * 1024
        write(path, orjson.dumps(doc))
        assert await cell.wait_for(2, 20)
        assert src.decoder is not None
        await asyncio.wait_for(asyncio.wrap_future(src.helper_ready), 30)
        await change(src, cell, path, doc, 1500)
        assert src.helper_deltas == 1
    finally:
        await src.stop()
