"""Decode a big graph file in a helper process and hand the proxy only what changed.

Decoding a 10,000-env graph (1.8 MB of JSON) takes orjson ~13-25 ms, all of it holding the
GIL, so in the proxy's own process every request waits for it, worker thread or not. The
helper process keeps a summary of the last document it decoded (resolver.sources.delta.summarize:
a digest of each env, ~1 MB at 10,000 envs against ~15 MB for the decoded document, so the
helper never holds two documents at once); for a changed file it decodes the new one, diffs it
against the summary and returns the delta: a few hundred bytes for a one-overlay change, which
the proxy applies to its own copy of the document in well under a millisecond. When the
helper's last document is not the one the proxy serves (first use, a respawned helper, a
rejected file) it answers "full" and the proxy decodes the file itself.

For a JSON file it also keeps the last file's bytes and their layout (json_splice.py), and
first tries to find the change from the bytes alone: ~2 ms instead of ~40 ms of decoding and
fingerprinting, which on a busy proxy's core shows as a latency spike at every reload.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import threading
import time
from typing import NamedTuple

from ..validate import load_document
from .delta import advance_summary, diff_summary, summarize
from .json_splice import Layout, layout, splice


class _Base(NamedTuple):
    """In the helper: the last file it read, as the base of the next delta."""
    digest: bytes
    summary: dict
    data: bytes  # kept for splice() with `layout`; b"" when the file cannot be spliced
    layout: Layout | None


def _base(digest: bytes, summary: dict, data: bytes, known: Layout | None = None) -> _Base:
    """`known`: data's layout when splice() gave it; else it is found here (once per base)."""
    lay = known if known is not None else layout(data)
    return _Base(digest, summary, data if lay is not None else b"", lay)


_last: _Base | None = None


def _background(parent: int) -> None:
    """The helper's initializer: graph decoding yields the CPU to the proxy's requests, and
    the helper exits when the proxy (`parent`, passed in: it may be gone before this runs)
    is gone, even SIGKILLed: its pool would not tell it."""
    try:
        os.nice(5)
    except OSError:
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="stax-parent-watch", daemon=True).start()


def file_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_change(path: str, base: bytes) -> tuple:
    """Runs in the helper. `base`: digest of the document the proxy serves. Returns
    ("same", digest) | ("delta", digest, delta, spliced) | ("full", digest), `spliced` True
    when the delta came from the bytes alone. Raises GraphInvalid or OSError (the proxy
    rejects the file and keeps serving)."""
    global _last
    with open(path, "rb") as f:
        data = f.read()
    digest = file_digest(data)
    if digest == base:
        return ("same", digest)
    previous = _last
    _last = None  # a rejected file must not become the base of the next delta
    if previous is None or previous.digest != base:
        _last = _decoded(data, digest)
        return ("full", digest)
    spliced = splice(previous.data, previous.layout, data) if previous.layout is not None else None
    if spliced is not None:
        delta, new_layout = spliced
        _last = _base(digest, advance_summary(previous.summary, delta), data, new_layout)
        return ("delta", digest, delta, True)
    doc = load_document(data)
    delta, summary = diff_summary(previous.summary, doc)
    _last = _base(digest, summary, data)
    return ("delta", digest, delta, False)


def _decoded(data: bytes, digest: bytes) -> _Base:
    return _base(digest, summarize(load_document(data)), data)


def remember(path: str) -> bytes:
    """Runs in the helper: decode the file as the base for later deltas; returns its digest."""
    global _last
    with open(path, "rb") as f:
        data = f.read()
    digest = file_digest(data)
    _last = _decoded(data, digest)
    return digest


class DecoderProcess:
    """One helper process (spawned on first use, respawned if it dies)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<DecoderProcess {'running' if self._pool is not None else 'idle'}>"

    def submit(self, fn, *args) -> concurrent.futures.Future:
        if self._pool is None:
            # spawn: never fork a process that runs an event loop and holds sockets
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_background, initargs=(os.getpid(),))
        try:
            return self._pool.submit(fn, *args)
        except concurrent.futures.BrokenExecutor:
            self.close()
            return self.submit(fn, *args)

    def broken(self) -> None:
        """The helper died mid-call: start a fresh one next time."""
        self.close()

    def pids(self) -> list[int]:
        procs = getattr(self._pool, "_processes", None) or {}
        return list(procs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
