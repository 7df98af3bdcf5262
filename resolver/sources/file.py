"""File graph source: load a YAML/JSON file and reload it within a second of any change.

Changes are detected by polling (inode, size, mtime) and a content hash, which catches both
`os.replace` and in-place rewrites on every filesystem, without inotify. A half-written or
invalid file is rejected whole; the serving snapshot stays and the next change is retried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os

from ..errors import GraphInvalid
from ..snapshot import Snapshot
from ..sync import SnapshotCell, build_snapshot, build_snapshot_from_bytes, build_snapshot_from_doc
from ..validate import load_document
from .delta import apply_delta, changed_envs
from .file_decoder import DecoderProcess, decode_change, file_digest, remember

# From this size on, a changed file is decoded and diffed in a helper process: the proxy
# itself only applies the delta (see file_decoder.py). Below it decoding takes under 2 ms.
HELPER_MIN_BYTES = 256 * 1024

log = logging.getLogger("stax.graph")


def load_file(path: str, *, version: int | None = None) -> Snapshot:
    """Load and validate a graph file synchronously (CLI, start-up). Raises GraphInvalid/OSError."""
    with open(path, "rb") as f:
        doc = load_document(f.read())
    return build_snapshot(doc, version=version, source=f"file:{path}")


class FileSource:
    def __init__(self, path: str, cell: SnapshotCell, *, interval: float = 0.25,
                 helper_min_bytes: int = HELPER_MIN_BYTES) -> None:
        self.path = path
        self.helper_min_bytes = helper_min_bytes
        self.decoder: DecoderProcess | None = None
        self.helper_deltas = 0  # changes applied as deltas from the helper process
        self.helper_spliced = 0  # of those, found from the file's bytes (json_splice.py)
        self.helper_ready: concurrent.futures.Future | None = None
        self.helper_unavailable = False
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
        self._digest = file_digest(data)
        doc = load_document(data)
        snap = build_snapshot(doc, version=None, source=f"file:{self.path}")
        self._previous = (doc, snap)
        self.cell.publish(snap)
        self.cell.source_connected = True
        self._maybe_start_helper(len(data))

    def _maybe_start_helper(self, size: int) -> None:
        """A big file (now, or once it grows) gets the helper process."""
        if self.decoder is None and not self.helper_unavailable and size >= self.helper_min_bytes:
            self.decoder = DecoderProcess()
            try:
                self.helper_ready = self.decoder.submit(remember, self.path)  # the first delta's base
            except Exception as exc:
                self._no_helper(exc)

    def _no_helper(self, exc: Exception) -> None:
        """No helper process can start here (no /dev/shm, a process limit): decode in the
        proxy, as for small files, from now on."""
        log.warning("graph file decoder process unavailable (%s); decoding in the proxy", exc)
        self.helper_unavailable = True
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

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
        previous = self._previous if self._previous and self._previous[1] is self.cell.current else None
        if self.decoder is not None and previous is not None and await self._check_in_helper(previous):
            return
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.cell.sync_error(f"file:{self.path}", exc)
            return
        digest = file_digest(data)
        if digest == self._digest:
            self.cell.confirm()
            return
        try:  # decoding a big file is work too: all of it happens off the loop
            snap, doc = await asyncio.to_thread(build_snapshot_from_bytes, data,
                                                version_if_unset=self.cell.version + 1,
                                                source=f"file:{self.path}", previous=previous)
        except GraphInvalid as exc:
            self.cell.reject(f"file:{self.path}", exc)
            return
        await self._accept(doc, snap, digest)
        self._maybe_start_helper(len(data))

    async def _accept(self, doc: dict, snap: Snapshot, digest: bytes) -> None:
        self._digest = digest
        self._previous = (doc, snap)
        await self.cell.install(snap)

    async def _check_in_helper(self, previous: tuple) -> bool:
        """The change handled through the helper process (True), or left to a full decode
        here (False: the helper has no matching base, or it died)."""
        source = f"file:{self.path}"
        try:
            future = self.decoder.submit(decode_change, self.path, self._digest)
        except Exception as exc:  # no helper can run here: decode in the proxy from now on
            self._no_helper(exc)
            return False
        try:
            answer = await asyncio.wrap_future(future)
        except GraphInvalid as exc:
            self.cell.reject(source, exc)
            return True
        except concurrent.futures.BrokenExecutor:
            log.warning("graph file decoder process died; decoding here and starting a new one")
            self.decoder.broken()
            return False
        except OSError as exc:  # the helper could not read the file
            self.cell.sync_error(source, exc)
            return True
        if answer[0] == "same":
            self.cell.confirm()
            return True
        if answer[0] != "delta":
            return False
        _, digest, delta, spliced = answer
        doc = apply_delta(previous[0], delta)
        try:  # validating the changed envs only: about a millisecond at 10,000 envs
            snap = await asyncio.to_thread(
                build_snapshot_from_doc, doc, version_if_unset=self.cell.version + 1,
                source=source, previous=previous, changed=changed_envs([delta]))
        except GraphInvalid as exc:
            self.cell.reject(source, exc)
            return True
        await self._accept(doc, snap, digest)
        self.helper_deltas += 1
        self.helper_spliced += spliced
        return True

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
        if self.decoder is not None:
            self.decoder.close()
