"""pytest plugin: a real, throw-away redis-server per test (`redis_server` fixture).

No persistence, bound to 127.0.0.1 on a free port, in a temporary directory. Tests can kill
it for real (SIGKILL) and start it again on the same port to exercise outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from loadtests.common import free_port

REDIS_SERVER = shutil.which("redis-server")
EXAMPLE_GRAPH = os.path.join(os.path.dirname(__file__), "data", "graph.yaml")


def example_graph() -> dict:
    """A fresh copy of tests/data/graph.yaml as a document (tests vary it)."""
    from resolver.validate import load_document

    with open(EXAMPLE_GRAPH, "rb") as f:
        return load_document(f.read())


def tls_files(tmp_path) -> tuple[str, str, str]:
    """A throw-away CA and a certificate for 127.0.0.1 (trustme): (ca, cert, key) paths."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = (str(tmp_path / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    return ca_file, cert_file, key_file


@contextlib.asynccontextmanager
async def running_source(store, *, wait: float = 5, **options):
    """A RedisSource following `store` into a fresh cell: (cell, source), stopped at the end."""
    from resolver.sources.redis_sync import RedisSource
    from resolver.sync import SnapshotCell

    cell = SnapshotCell()
    source = RedisSource(store, cell, **options)
    await source.start(wait=wait)
    try:
        yield cell, source
    finally:
        await source.stop()


async def push_until(store, doc: dict, timeout: float, step: float = 0.1) -> int:
    """Push, retrying while the store cannot reach a primary (a node starting, a failover in
    progress): a bounded wait, not a speed test."""
    from resolver.errors import StoreUnavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await store.push(doc)
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(step)


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` passes (a bounded wait, not a speed test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(step)
    return True




class RedisServer:
    def __init__(self, directory: str, port: int | None = None, *, password: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self._log = os.path.join(directory, "redis.log")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self.port} {state}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port; returns once it answers PING."""
        if self.running:
            return
        assert REDIS_SERVER is not None
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--bind", "127.0.0.1", "--dir", self.dir, "--daemonize", "no",
                 "--loglevel", "warning",
                 *(("--requirepass", self.password) if self.password else ()), *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                with open(self._log, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill it for real (SIGKILL): no graceful shutdown, connections just die."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        """A synchronous client for assertions and direct (bypassing) writes."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=2, socket_connect_timeout=2)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (install redis-server to run Redis tests)")
    server = RedisServer(str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()
