"""RedisSource: keep a SnapshotCell in step with the Redis store.

Two tasks. The listener holds a pub/sub subscription to the change channel, pings it every
`ping_interval` and replaces it when no pong comes back within `ping_timeout` (a silently
dead TCP connection delivers nothing and reports nothing); every message, and every
resubscription (messages sent meanwhile are lost), wakes the sync loop. The sync loop polls
the version every `poll_interval` anyway, so a lost message costs at most one interval.

On a newer version the loop applies the stream's deltas to the last good document when it is
at most `max_delta_gap` versions behind and the records provably start from that document
(their base digest), else it loads the whole graph. Either way the snapshot is validated and
built off the loop, then published with one reference swap. A graph that fails validation is
rejected and the last good snapshot keeps serving; so does any error talking to Redis, after
which the first successful poll reloads the whole graph. A lower version in the same epoch
(a failover to a stale replica, a restore) is held off for `regression_hold` seconds in case
the store catches up; a new epoch (a wiped or different store) is adopted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson

from ..errors import GraphInvalid, StoreUnavailable
from ..snapshot import Snapshot
from ..sync import SnapshotCell, build_snapshot_off_loop, read_cache, write_cache
from .delta import apply_delta, changed_envs
from .redis_store import RedisStore, doc_digest

log = logging.getLogger("stax.graph")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0


class RedisSource:
    def __init__(self, store: RedisStore, cell: SnapshotCell, *, poll_interval: float = 1.0,
                 ping_interval: float = 5.0, ping_timeout: float = 2.0,
                 cache_file: str | None = None, regression_hold: float = 30.0,
                 max_delta_gap: int = 50) -> None:
        self.store = store
        self.cell = cell
        self.poll_interval = poll_interval
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.cache_file = cache_file
        self.regression_hold = regression_hold
        self.max_delta_gap = max_delta_gap
        self.name = f"redis:{store.safe_url}"
        # counters (tests, metrics)
        self.full_loads = 0
        self.delta_loads = 0
        self.errors_total = 0  # failed polls/loads
        self.pubsub_reconnects = 0  # pub/sub connections replaced (dropped, killed, silent)
        self.messages_total = 0
        self.pubsub_subscribed = False  # the listener holds a live subscription
        # what this source serves: the stored document (for deltas) and its identity
        self._doc: dict | None = None
        self._digest = ""
        self._version: int | None = None
        self._epoch: str | None = None
        self._need_full = True
        self._rejected: tuple[str, int] | None = None  # (epoch, version) that failed validation
        self._regress_version: int | None = None
        self._regress_since = 0.0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._first_poll: asyncio.Event | None = None

    def __repr__(self) -> str:
        return (f"<RedisSource {self.store.safe_url} v{self.cell.version} "
                f"connected={self.cell.source_connected} full_loads={self.full_loads} "
                f"delta_loads={self.delta_loads} errors={self.errors_total}>")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, wait: float = 5.0) -> None:
        """Start syncing. Returns once a snapshot is serving (from Redis, else from the cache
        file) or `wait` seconds passed; the loop keeps trying in the background either way."""
        if self._tasks:
            return
        self._stopping = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._wake = asyncio.Event()
        self._first_poll = asyncio.Event()
        self._tasks = [
            loop.create_task(self._run(), name="stax-redis-sync"),
            loop.create_task(self._listen(), name="stax-redis-listen"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(wait, 0.0)):
                await self._first_poll.wait()
        if self.cell.current is None and self.cache_file:
            snap = await asyncio.to_thread(read_cache, self.cache_file)
            if snap is not None and self.cell.current is None:
                self._serve_cached(snap)
        remaining = deadline - loop.time()
        if self.cell.current is None and remaining > 0:
            await self.cell.wait_for(1, remaining)

    async def stop(self) -> None:
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        # Cancel until done: on Python 3.11 redis-py can swallow a cancellation (its
        # asyncio.wait_for around socket writes, CPython gh-86296); the loops also check
        # _stopping, so a swallowed cancel ends them at the next iteration.
        for _ in range(100):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        await asyncio.gather(*(t for t in tasks if t.done()), return_exceptions=True)

    def _serve_cached(self, snap: Snapshot) -> None:
        log.warning("redis store %s not serving a graph yet; serving cached v%s from %s",
                    self.store.safe_url, snap.version, self.cache_file)
        self._version, self._epoch = snap.version, snap.graph.epoch
        self._doc, self._digest, self._need_full = None, "", True
        self.cell.publish(snap)

    # -- the sync loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        assert self._wake is not None and self._first_poll is not None
        while not self._stopping:
            try:
                self._wake.clear()  # before polling: a message during the poll wakes us again
                ok = await self.check()
                self._first_poll.set()
                if ok:
                    backoff, delay = _BACKOFF_MIN, self.poll_interval
                    if self._regress_version is not None:  # wake when the hold ends
                        left = self._regress_since + self.regression_hold - time.monotonic()
                        delay = min(delay, max(left, 0.01))
                else:
                    delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - check() catches; this is the last guard
                log.exception("redis sync loop error; retrying")
                await asyncio.sleep(_BACKOFF_MAX)

    async def check(self) -> bool:
        """One poll (and load, if the store moved). Never raises; False when it failed."""
        try:
            await self._sync()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.errors_total += 1
            self._need_full = True  # whatever we missed, the next good poll reloads it all
            self.cell.source_connected = False
            if not str(exc):  # TimeoutError() says nothing by itself
                exc = StoreUnavailable(f"{type(exc).__name__} talking to {self.store.safe_url}")
            self.cell.sync_error(self.name, exc)
            return False
        return True

    async def _sync(self) -> None:
        async with asyncio.timeout(self.ping_timeout):
            version, epoch = await self.store.head()
        if not self.cell.source_connected:
            self.cell.source_connected = True
            log.info("graph source %s connected (store v%s)", self.name, version)
        self.cell.confirm()
        if version == 0:
            return  # empty store: keep serving whatever we have (cache, last good)
        if self._rejected == (epoch, version):
            return  # already rejected this exact version; wait for the next one
        if self._version is None or epoch != self._epoch:
            await self._load_full()
            return
        if version < self._version:
            await self._regressed(version)
            return
        if self._regress_version is not None:  # the store caught up again
            self._end_regression()
            self._need_full = True  # same number need not mean same graph after a regression
        if version == self._version:
            if self._need_full or self._doc is None:
                await self._load_full()
            return
        if (not self._need_full and self._doc is not None
                and version - self._version <= self.max_delta_gap
                and await self._load_deltas()):
            return
        await self._load_full()

    async def _load_full(self, *, adopt_lower: bool = False) -> None:
        version, epoch, data = await self.store.read_raw()
        if version == 0 or data is None:
            return
        if self._rejected == (epoch, version):
            return
        if (not adopt_lower and self._version is not None and epoch == self._epoch
                and version < self._version):
            await self._regressed(version)  # moved back between the poll and this read
            return
        try:
            doc, digest = await asyncio.to_thread(_decode, data)
        except GraphInvalid as exc:
            self._reject(epoch, version, exc)
            return
        snap = await self._build(doc, version, epoch)
        if snap is not None:
            self.full_loads += 1
            await self._accept(snap, doc, digest, version, epoch)

    async def _load_deltas(self) -> bool:
        """Catch up through the delta stream. False when the stream cannot prove a chain from
        the document we hold (then the caller loads the whole graph)."""
        assert self._version is not None and self._doc is not None
        _, epoch, records = await self.store.delta_records(self._version,
                                                           limit=self.max_delta_gap)
        if not records or epoch != self._epoch or records[0].base != self._digest:
            return False
        last = records[-1]
        if self._rejected == (epoch, last.version):
            return True
        try:
            doc = self._doc
            for rec in records:
                doc = apply_delta(doc, rec.delta)
        except ValueError as exc:
            log.warning("graph deltas from %s do not apply (%s); loading the whole graph",
                        self.name, exc)
            return False
        # Envs the deltas did not touch keep their validated objects (see parse_graph).
        cur = self.cell.current
        reuse = None
        if cur is not None and cur.version == self._version and cur.graph.epoch == epoch:
            reuse = cur
        snap = await self._build(doc, last.version, epoch, reuse=reuse,
                                 changed=changed_envs([rec.delta for rec in records]))
        if snap is not None:
            self.delta_loads += 1
            await self._accept(snap, doc, last.digest, last.version, epoch)
        return True

    async def _regressed(self, version: int) -> None:
        now = time.monotonic()
        if self._regress_version is not None and version > self._regress_version:
            # someone wrote to the regressed store on purpose (`stax graph push`, the control
            # plane): that is the graph the operator wants now
            log.warning("graph store %s was written (v%s) while held; adopting it", self.name, version)
            await self._load_full(adopt_lower=True)
            return
        if self._regress_version != version:  # first sight, or the store moved: (re)start
            if self._regress_version is None:
                log.warning("graph store %s went back to v%s in the same epoch while serving "
                            "v%s; holding for %.1fs", self.name, version, self._version,
                            self.regression_hold)
            self._regress_version, self._regress_since = version, now
            self.cell.regression = True
            if self.regression_hold > 0:
                return
        if now - self._regress_since >= self.regression_hold:
            log.warning("graph store %s stayed at v%s for %.1fs; adopting it", self.name,
                        version, self.regression_hold)
            await self._load_full(adopt_lower=True)

    def _end_regression(self) -> None:
        self._regress_version = None
        self.cell.regression = False

    async def _build(self, doc: Any, version: int, epoch: str, *, reuse=None,
                     changed: frozenset | None = None) -> Snapshot | None:
        try:
            if not isinstance(doc, dict):
                raise GraphInvalid(["graph document must be a mapping with 'baseline' and 'envs'"])
            return await build_snapshot_off_loop({**doc, "epoch": epoch}, version=version,
                                                 source=self.name, reuse=reuse, changed=changed)
        except GraphInvalid as exc:
            self._reject(epoch, version, exc)
        except Exception as exc:  # a bug in validation must not look like a Redis outage
            log.exception("building graph v%s from %s failed", version, self.name)
            self._reject(epoch, version, exc)
        return None

    def _reject(self, epoch: str, version: int, exc: Exception) -> None:
        self._rejected = (epoch, version)
        self.cell.reject(f"{self.name} v{version}", exc)

    async def _accept(self, snap: Snapshot, doc: dict, digest: str, version: int,
                      epoch: str) -> None:
        self._doc, self._digest, self._version, self._epoch = doc, digest, version, epoch
        self._need_full = False
        self._rejected = None
        self._end_regression()
        await self.cell.install(snap)
        if self.cache_file:
            try:
                await asyncio.to_thread(write_cache, self.cache_file,
                                        {**doc, "version": version, "epoch": epoch})
            except Exception as exc:  # a full disk must not stop graph updates
                log.warning("could not write graph cache %s: %s", self.cache_file, exc)

    # -- the pub/sub listener --------------------------------------------------------------
    async def _listen(self) -> None:
        backoff = _BACKOFF_MIN
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        first = True
        while not self._stopping:
            pubsub = self.store.pubsub()
            try:
                async with asyncio.timeout(self.ping_timeout):
                    await pubsub.subscribe(self.store.channel)
                if not first:
                    self.pubsub_reconnects += 1
                first = False
                self.pubsub_subscribed = True
                self._wake.set()  # anything published while we were away is lost: poll now
                backoff = _BACKOFF_MIN
                await self._receive(pubsub, loop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("graph change subscription to %s lost (%s); resubscribing",
                         self.store.safe_url, exc or type(exc).__name__)
            finally:
                self.pubsub_subscribed = False
                try:
                    async with asyncio.timeout(self.ping_timeout):
                        await pubsub.aclose()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the connection is being thrown away anyway
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _receive(self, pubsub: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Read messages until the connection fails or stops answering pings."""
        assert self._wake is not None
        heard = loop.time()
        ping_sent: float | None = None
        step = min(0.25, self.ping_interval, self.ping_timeout)
        while not self._stopping:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=step)
            now = loop.time()
            if msg is not None:
                heard, ping_sent = now, None
                if msg["type"] == "message":
                    self.messages_total += 1
                    self._wake.set()
            if ping_sent is not None:
                if now - ping_sent > self.ping_timeout:
                    raise ConnectionError(f"no pong within {self.ping_timeout}s")
            elif now - heard >= self.ping_interval:
                async with asyncio.timeout(self.ping_timeout):
                    await pubsub.ping()
                ping_sent = now


def _decode(data: bytes) -> tuple[Any, str]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise GraphInvalid([f"stored graph is not JSON: {exc}"]) from None
    return doc, doc_digest(data)
