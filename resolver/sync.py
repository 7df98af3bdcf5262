"""The watch cell that holds the serving snapshot, and the helpers every graph source shares.

Readers never block: they read `cell.current` once per request. Sources validate and build
the next snapshot off the hot path (in a worker thread), then publish it with one reference
assignment. A rejected graph leaves `current` untouched and is counted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
import time
from typing import Any

import orjson

from .errors import GraphInvalid
from .snapshot import Snapshot
from .validate import load_document, parse_graph

log = logging.getLogger("stax.graph")


class SnapshotCell:
    def __init__(self) -> None:
        self.current: Snapshot | None = None
        self.source_connected = False
        self.confirmed_at = 0.0  # last time the source confirmed `current` is the newest
        self.rejected_total = 0
        self.sync_errors_total = 0
        self.regression = False
        self.last_error = ""
        self._waiters: list[tuple[int, asyncio.Future]] = []  # (version, future): wait_for()

    def __repr__(self) -> str:
        return (f"<SnapshotCell v{self.version} connected={self.source_connected} "
                f"rejected={self.rejected_total} sync_errors={self.sync_errors_total}>")

    @property
    def version(self) -> int:
        return self.current.version if self.current else 0

    @property
    def age_s(self) -> float:
        return time.time() - self.confirmed_at if self.current else 0.0

    def confirm(self) -> None:
        self.confirmed_at = time.time()

    def publish(self, snapshot: Snapshot) -> None:
        for _ in snapshot.carry_steps():  # not installed: carried whole, the previous one let go
            pass
        self._serve(snapshot)

    async def install(self, snapshot: Snapshot) -> None:
        """Publish a snapshot built from the current one at once, then carry the answers it
        keeps over behind it, on the loop in short slices (Snapshot.carry_steps)."""
        self._serve(snapshot)
        for _ in snapshot.carry_steps():
            await asyncio.sleep(0)

    def _serve(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        self.confirm()
        self.last_error = ""  # a newer graph landed: whatever failed before is behind it
        # A snapshot lives until the next one: keep the collector from walking it again and
        # again (full collections of a 10,000-env graph cost ~100 ms each on the loop).
        gc.freeze()
        log.info("graph v%s serving (%s envs, from %s)", snapshot.version,
                 len(snapshot.graph.envs), snapshot.source)
        if self._waiters:
            waiting, self._waiters = self._waiters, []
            for version, fut in waiting:
                if fut.done():
                    continue
                if snapshot.version >= version:
                    fut.set_result(True)
                else:
                    self._waiters.append((version, fut))

    def reject(self, source: str, exc: Exception) -> None:
        self.rejected_total += 1
        self.last_error = f"{source}: {exc}"
        log.error("graph rejected from %s, keeping v%s: %s", source, self.version, exc)

    def sync_error(self, source: str, exc: Exception) -> None:
        self.sync_errors_total += 1
        self.last_error = f"{source}: {exc}"
        log.warning("graph sync error from %s (serving v%s): %s", source, self.version, exc)

    async def wait_for(self, version: int, timeout: float) -> bool:
        """Wait until the serving version is >= `version` (tests, demo)."""
        if self.version >= version:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((version, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False


def build_snapshot(doc: Any, *, version: int | None, source: str, reuse: Snapshot | None = None,
                   changed: frozenset | None = None) -> Snapshot:
    """Validate + build; raises GraphInvalid. Pure and thread-safe: run it off the loop.
    With `reuse` (the snapshot `doc` was derived from) and `changed` (the envs that differ),
    unchanged envs keep their validated objects and their resolutions (see parse_graph)."""
    graph = parse_graph(doc, version=version, reuse=reuse.graph if reuse is not None else None,
                        changed=changed)
    return Snapshot(graph, source=source, previous=reuse, changed=changed)


def build_snapshot_from_bytes(data: bytes, *, version_if_unset: int | None, source: str,
                              previous: tuple[dict, Snapshot] | None = None) -> tuple[Snapshot, Any]:
    """Decode + validate + build (a file source's whole job), for a worker thread."""
    doc = load_document(data)
    return build_snapshot_from_doc(doc, version_if_unset=version_if_unset, source=source,
                                   previous=previous), doc


def build_snapshot_from_doc(doc: Any, *, version_if_unset: int | None, source: str,
                            previous: tuple[dict, Snapshot] | None = None,
                            changed: frozenset | None = None) -> Snapshot:
    """A file's document validated and built; its own `version`, if any, wins. With the
    previous (document, snapshot), envs that did not change keep their validated objects and
    resolutions; `changed` names them when known (a delta), else they are found by a diff."""
    from .sources.delta import changed_env_names

    explicit = isinstance(doc, dict) and "version" in doc
    reuse = None
    if previous is not None:
        if changed is None:
            changed = changed_env_names(previous[0], doc)
        reuse = previous[1] if changed is not None else None
    return build_snapshot(doc, version=None if explicit else version_if_unset, source=source,
                          reuse=reuse, changed=changed if reuse is not None else None)


async def build_snapshot_off_loop(doc: Any, *, version: int | None, source: str, reuse=None,
                                  changed: frozenset | None = None) -> Snapshot:
    # A 10,000-env graph takes a few hundred ms to validate; a thread keeps the loop serving
    # (the GIL is released to it every switch interval).
    return await asyncio.to_thread(build_snapshot, doc, version=version, source=source,
                                   reuse=reuse, changed=changed)


def write_cache(path: str, doc: dict) -> None:
    """Persist the last good graph atomically (write a temp file, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".stax-graph-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_cache(path: str) -> Snapshot | None:
    try:
        with open(path, "rb") as f:
            doc = load_document(f.read())
        return build_snapshot(doc, version=None, source=f"cache:{path}")
    except FileNotFoundError:
        return None
    except (OSError, GraphInvalid) as exc:
        log.warning("graph cache %s unusable: %s", path, exc)
        return None
