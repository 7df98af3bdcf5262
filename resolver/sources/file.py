"""File graph source: load a YAML/JSON file and reload it within a second of any change.

Changes are detected by polling (inode, size, mtime) and a content hash, which catches both
`os.replace` and in-place rewrites on every filesystem, without inotify. A half-written or
invalid file is rejected whole; the serving snapshot stays and the next change is retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

from ..errors import GraphInvalid
from ..snapshot import Snapshot
from ..sync import SnapshotCell, build_snapshot, build_snapshot_from_bytes
from ..validate import load_document

log = logging.getLogger("stax.graph")


def load_file(path: str, *, version: int | None = None) -> Snapshot:
    """Load and validate a graph file synchronously (CLI, start-up). Raises GraphInvalid/OSError."""
    with open(path, "rb") as f:
        doc = load_document(f.read())
    return build_snapshot(doc, version=version, source=f"file:{path}")


class FileSource:
    def __init__(self, path: str, cell: SnapshotCell, *, interval: float = 0.25) -> None:
        self.path = path
        self.cell = cell
        self.interval = interval
        self._stat: tuple | None = None
        self._digest = b""
        self._task: asyncio.Task | None = None
        self._previous: tuple | None = None  # (document, snapshot) last accepted from the file

    def __repr__(self) -> str:
        return f"<FileSource {self.path} v{self.cell.version}>"

    def load_initial(self) -> None:
        """First load, synchronous: a proxy with a bad graph file must fail to start."""
        self._stat = self._read_stat()
        with open(self.path, "rb") as f:
            data = f.read()
        self._digest = hashlib.sha256(data).digest()
        doc = load_document(data)
        snap = build_snapshot(doc, version=None, source=f"file:{self.path}")
        self._previous = (doc, snap)
        self.cell.publish(snap)
        self.cell.source_connected = True

    def _read_stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def check(self) -> None:
        stat = self._read_stat()
        if stat is None:
            self.cell.source_connected = False
            return
        self.cell.source_connected = True
        if stat == self._stat:
            self.cell.confirm()
            return
        self._stat = stat
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.cell.sync_error(f"file:{self.path}", exc)
            return
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            self.cell.confirm()
            return
        previous = self._previous if self._previous and self._previous[1] is self.cell.current else None
        try:  # decoding a big file is work too: all of it happens off the loop
            snap, doc = await asyncio.to_thread(build_snapshot_from_bytes, data,
                                                version_if_unset=self.cell.version + 1,
                                                source=f"file:{self.path}", previous=previous)
        except GraphInvalid as exc:
            self.cell.reject(f"file:{self.path}", exc)
            return
        self._digest = digest
        self._previous = (doc, snap)
        self.cell.publish(snap)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception as exc:  # never let the watcher die
                self.cell.sync_error(f"file:{self.path}", exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
