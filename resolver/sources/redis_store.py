"""The Redis graph store: one atomic write path, atomic reads and a capped delta stream.

Every key of one graph carries the hash tag `{graph}`, so on Redis Cluster they share a slot
and the write script may touch them all:

    {prefix}{graph}:doc      the graph document, JSON, without 'version' and 'epoch'
    {prefix}{graph}:version  integer, bumped by every accepted push
    {prefix}{graph}:epoch    random hex made by the first push; names one store lineage
    {prefix}{graph}:deltas   capped stream (MAXLEN ~ 1000), one record per version:
                             version, delta (JSON, see delta.py), base and digest (content
                             hashes of the document before and after, so a reader can prove a
                             chain of deltas starts from the document it holds)
    {prefix}{graph}:audit    audit stream (control plane), one record per audited push
    {prefix}{graph}:changes  pub/sub channel; each push publishes its new version

A push validates in Python, computes the delta against the document it read, then runs one
Lua script that checks the version it read is still current (else the push is retried with a
fresh delta) and the caller's expected version, writes everything and publishes. Reads of more
than one key are Lua scripts too: atomic, and on a cluster routed (MOVED followed) like any
single-slot command. Callers never see a redis-py exception: every failure to talk to Redis is
StoreUnavailable, with the URL (password redacted) in the message.

URLs: `redis://`, `rediss://` and `unix://` (one server, redis-py's own URL format),
`redis+sentinel://` (see parse_sentinel_url) and `redis+cluster://` (see parse_cluster_url).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ..errors import StoreUnavailable, VersionConflict
from ..validate import parse_graph
from .delta import diff_docs

DELTA_STREAM_MAXLEN = 1000  # approximate (MAXLEN ~): Redis trims whole stream nodes
AUDIT_STREAM_MAXLEN = 100_000
STORE_OWNED_KEYS = ("version", "epoch")  # live in their own keys, never in the stored doc
_PUSH_ATTEMPTS = 50  # retries when another writer moved the version between read and write
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
# Query options a cluster URL may carry (passed to every node connection); anything else is
# refused rather than silently ignored.
_CLUSTER_URL_OPTIONS = frozenset({
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval",
    "max_connections", "client_name", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_ciphers"})

# KEYS: doc, version, epoch, deltas, audit
# ARGV: expect ('' = any), version read, doc, delta, base, digest, epoch candidate,
#       deltas maxlen, audit record ('' = none), audit maxlen, channel
_PUSH_LUA = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[1] ~= '' and cur ~= tonumber(ARGV[1]) then return {'conflict', cur} end
if cur ~= tonumber(ARGV[2]) then return {'moved', cur} end
local new = cur + 1
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], new)
redis.call('SET', KEYS[3], ARGV[7], 'NX')
local epoch = redis.call('GET', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*',
           'version', new, 'delta', ARGV[4], 'base', ARGV[5], 'digest', ARGV[6])
if ARGV[9] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*',
             'version', new, 'epoch', epoch, 'record', ARGV[9])
end
redis.call('PUBLISH', ARGV[11], new)
return {'ok', new, epoch}
"""

# KEYS: version, epoch[, doc]   Returns their values, in order; false (a nil reply) for a
# missing key.
_READ_LUA = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('GET', key) end
return out
"""

# KEYS: version, epoch, deltas   ARGV: since, limit
# Returns {version, epoch} when more than `limit` records would be needed, else
# {version, epoch, records newest first}.
_DELTAS_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[2]) or ''
local want = cur - tonumber(ARGV[1])
if want <= 0 then return {cur, epoch, {}} end
if want > tonumber(ARGV[2]) then return {cur, epoch} end
return {cur, epoch, redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', want)}
"""


class DeltaRecord(NamedTuple):
    version: int
    delta: dict
    base: str  # digest of the stored document this delta applies to
    digest: str  # digest of the stored document it produces


def doc_digest(data: bytes) -> str:
    """Content hash of a stored document (the exact JSON bytes in the doc key)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def stored_form(doc: dict) -> dict:
    """The document as stored: without the keys the store owns (version, epoch)."""
    return {k: v for k, v in doc.items() if k not in STORE_OWNED_KEYS}


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, fit for messages and logs."""
    url = re.sub(r"^([a-z+]+://)([^/@]*?):([^/@]*)@", r"\1\2:***@", url)
    return re.sub(r"((?:^|[?&])(?:sentinel_)?password=)[^&]*", r"\1***", url)


def _split_url(url: str, kind: str) -> tuple[str, str | None, str | None, str, str, str]:
    """`redis[s]+<kind>://[user:pass@]hosts[/path][?query]` -> its parts."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (f"redis+{kind}", f"rediss+{kind}"):
        raise ValueError(f"not a {kind} URL: {redact_url(url)}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username, password, hosts = _split_netloc(netloc)
    return scheme, username, password, hosts, path, query


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    ssl: bool


def parse_sentinel_url(url: str) -> SentinelURL:
    """`redis+sentinel://[user:pass@]h1:26379,h2:26379/mymaster[/db][?sentinel_password=...]`.

    The password in the userinfo is the master's; `sentinel_password` authenticates to the
    sentinels. `rediss+sentinel://` uses TLS for both.
    """
    scheme, username, password, hosts, path, query = _split_url(url, "sentinel")
    sentinels = _parse_hosts(hosts, _SENTINEL_PORT, url, "sentinel")
    parts = [unquote(p) for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2:
        raise ValueError(
            f"want redis+sentinel://host:port[,host:port...]/service[/db], got {redact_url(url)}")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"sentinel URL has a bad db {parts[1]!r}: {redact_url(url)}") from None
    params = parse_qs(query)
    sentinel_password = params.get("sentinel_password", [None])[0]
    return SentinelURL(sentinels, parts[0], db, username, password, sentinel_password,
                       scheme.startswith("rediss"))


class ClusterURL(NamedTuple):
    nodes: list[tuple[str, int]]  # startup nodes: any reachable one discovers the cluster
    username: str | None
    password: str | None
    ssl: bool
    options: dict[str, Any]  # connection options from the query string


def parse_cluster_url(url: str) -> ClusterURL:
    """`redis+cluster://[user:pass@]h1:p1,h2:p2[,...][/[0]][?option=value&...]`.

    Any one reachable node is enough to discover the whole cluster; a port defaults to 6379.
    The password in the userinfo authenticates to every node; `rediss+cluster://` uses TLS.
    A cluster has only db 0. Options: socket and TLS settings (`ssl_ca_certs`, ...), see
    _CLUSTER_URL_OPTIONS.
    """
    scheme, username, password, hosts, path, query = _split_url(url, "cluster")
    nodes = _parse_hosts(hosts, _REDIS_PORT, url, "cluster")
    if not nodes:
        raise ValueError(f"want redis+cluster://host:port[,host:port...][/], got "
                         f"{redact_url(url)}")
    if unquote(path).strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only db 0, got {redact_url(url)}")
    options: dict[str, Any] = {}
    for name, values in parse_qs(query).items():
        if name not in _CLUSTER_URL_OPTIONS:
            raise ValueError(f"cluster URL option {name!r} is not supported (want one of "
                             f"{', '.join(sorted(_CLUSTER_URL_OPTIONS))}): {redact_url(url)}")
        try:
            options[name] = URL_QUERY_ARGUMENT_PARSERS.get(name, str)(values[0])
        except (TypeError, ValueError):
            raise ValueError(f"cluster URL option {name!r} has a bad value: "
                             f"{redact_url(url)}") from None
    return ClusterURL(nodes, username, password, scheme.startswith("rediss"), options)


def _split_netloc(netloc: str) -> tuple[str | None, str | None, str]:
    """`[user[:password]@]hosts` -> (username, password, hosts), percent-decoded."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, pw = userinfo.partition(":")
    return unquote(user) or None, unquote(pw) if colon else None, hosts


def _parse_hosts(hosts: str, default_port: int, url: str, kind: str) -> list[tuple[str, int]]:
    """`h1:p1,h2,[::1]:p3` -> [(host, port), ...]."""
    out = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, tail = item[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError(f"{kind} URL has an empty host: {redact_url(url)}")
        try:
            out.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"{kind} URL has a bad port {port!r}: {redact_url(url)}") from None
    return out


class _ClusterPubSub(ClusterPubSub):
    """ClusterPubSub that discovers the cluster before its first command: ClusterPubSub picks
    its node from the client's slot table (the node owning the channel's slot; PUBLISH reaches
    every node anyway) and raises KeyError(slot) while that table is empty. A client marked
    for rediscovery (a node failed) is rediscovered here too, so a new subscription after a
    failover goes to the slot's current owner."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None and self.connection_pool is None:
            await self.cluster.initialize()
        return await super().execute_command(*args, **kwargs)


def check_url(url: str) -> None:
    """Raise ValueError naming what is wrong with a Redis URL, without connecting: for
    `--check-config` and the CLI, before anything starts."""
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        parse_sentinel_url(url)
    elif url.startswith(("redis+cluster://", "rediss+cluster://")):
        parse_cluster_url(url)
    elif url.startswith(("redis://", "rediss://", "unix://")):
        try:
            parse_url(url)
        except ValueError as exc:
            raise ValueError(f"bad Redis URL {redact_url(url)}: {exc}") from None
    else:
        raise ValueError(f"unsupported Redis URL {redact_url(url)}: want redis://, rediss://, "
                         "unix://, redis+sentinel:// or redis+cluster://")


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "stax:", socket_timeout: float = 2.0) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.prefix = prefix
        base = f"{prefix}{{graph}}"
        self.doc_key = f"{base}:doc"
        self.version_key = f"{base}:version"
        self.epoch_key = f"{base}:epoch"
        self.deltas_key = f"{base}:deltas"
        self.audit_key = f"{base}:audit"
        self.channel = f"{base}:changes"
        self._sentinel: Sentinel | None = None
        self._client: aioredis.Redis | RedisCluster
        # No retries inside redis-py: a retried push could apply twice, and the sync loop
        # has its own backoff. Failures surface at once as StoreUnavailable.
        opts: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            su = parse_sentinel_url(url)
            sentinel_opts = {**opts, "ssl": su.ssl}
            if su.sentinel_password:
                sentinel_opts["password"] = su.sentinel_password
            self._sentinel = Sentinel(su.sentinels, sentinel_kwargs=sentinel_opts, **opts)
            self._client = self._sentinel.master_for(
                su.service, db=su.db, username=su.username, password=su.password, ssl=su.ssl)
        elif url.startswith(("redis+cluster://", "rediss+cluster://")):
            cu = parse_cluster_url(url)
            # Connects lazily: the first command (or subscription, see _ClusterPubSub)
            # discovers the slot table from any reachable startup node. Not every slot need
            # be covered: only the one slot of {graph} matters here.
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in cu.nodes],
                username=cu.username, password=cu.password, ssl=cu.ssl,
                require_full_coverage=False, **{**opts, **cu.options})
        else:
            check_url(url)  # the one place that says what a URL may be
            self._client = aioredis.from_url(url, **opts)
        self._push_script = self._client.register_script(_PUSH_LUA)
        self._read_script = self._client.register_script(_READ_LUA)
        self._deltas_script = self._client.register_script(_DELTAS_LUA)

    def __repr__(self) -> str:
        return f"<RedisStore {self.safe_url} prefix={self.prefix!r}>"

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Turn any failure to talk to Redis into StoreUnavailable (the boundary)."""
        try:
            yield
        # TimeoutError is an OSError; RedisClusterException (no node reachable, slot not
        # covered) is not a RedisError
        except (RedisError, RedisClusterException, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreUnavailable(
                f"redis store {self.safe_url}: {what} failed: {detail}") from exc

    # -- reads -----------------------------------------------------------------------------
    async def version(self) -> int:
        """The stored graph version; 0 when no graph is stored."""
        with self._mapped("reading the version"):
            raw = await self._client.get(self.version_key)
        return self._int(raw)

    async def epoch(self) -> str:
        """The store's epoch id; "" when no graph was ever pushed."""
        with self._mapped("reading the epoch"):
            raw = await self._client.get(self.epoch_key)
        return raw.decode() if raw else ""

    async def head(self) -> tuple[int, str]:
        """(version, epoch), read atomically: what the sync loop polls."""
        with self._mapped("reading the version"):
            raw_version, raw_epoch = await self._get_many(self.version_key, self.epoch_key)
        return self._int(raw_version), raw_epoch.decode() if raw_epoch else ""

    async def read_raw(self) -> tuple[int, str, bytes | None]:
        """(version, epoch, stored JSON bytes), read atomically."""
        with self._mapped("reading the graph"):
            raw_version, raw_epoch, data = await self._get_many(
                self.version_key, self.epoch_key, self.doc_key)
        return self._int(raw_version), raw_epoch.decode() if raw_epoch else "", data

    async def read(self) -> tuple[int, str, dict | None]:
        """(version, epoch, doc), read atomically. The doc has no 'version'/'epoch' keys;
        it is None when no graph is stored."""
        version, epoch, data = await self.read_raw()
        if data is None:
            return version, epoch, None
        try:
            return version, epoch, orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StoreUnavailable(
                f"redis store {self.safe_url}: {self.doc_key} does not hold JSON: {exc}") from None

    async def delta_records(self, since: int, *, limit: int = DELTA_STREAM_MAXLEN + 200,
                            ) -> tuple[int, str, list[DeltaRecord] | None]:
        """(version, epoch, records for since+1..version), read atomically. The records are
        None when they cannot be proven complete: more than `limit` needed, trimmed from the
        stream, a version written without a record, or a broken base->digest chain."""
        with self._mapped("reading deltas"):
            res = await self._deltas_script(
                keys=[self.version_key, self.epoch_key, self.deltas_key], args=[since, limit])
        current, epoch = int(res[0]), res[1].decode() if res[1] else ""
        if len(res) < 3 or since > current:
            return current, epoch, None
        records: list[DeltaRecord] = []
        expect = current
        for _id, flat in res[2]:  # newest first
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            try:
                rec = DeltaRecord(int(fields[b"version"]), orjson.loads(fields[b"delta"]),
                                  fields[b"base"].decode(), fields[b"digest"].decode())
            except (KeyError, ValueError):
                return current, epoch, None
            if rec.version != expect or not isinstance(rec.delta, dict):
                return current, epoch, None
            records.append(rec)
            expect -= 1
        if expect != since:
            return current, epoch, None
        records.reverse()
        for prev, rec in zip(records, records[1:], strict=False):
            if rec.base != prev.digest:
                return current, epoch, None
        return current, epoch, records

    async def deltas_since(self, version: int) -> list[tuple[int, dict]] | None:
        """Deltas for versions version+1..current, oldest first ([] when current), or None
        when the stream no longer reaches back that far."""
        _, _, records = await self.delta_records(version)
        if records is None:
            return None
        return [(r.version, r.delta) for r in records]

    def pubsub(self) -> aioredis.client.PubSub:
        """A new pub/sub handle on the store's connection settings (the caller closes it).
        On a cluster it subscribes on one node (PUBLISH is broadcast to every node)."""
        if isinstance(self._client, RedisCluster):
            return _ClusterPubSub(self._client)
        return self._client.pubsub()

    # -- the one write path ----------------------------------------------------------------
    async def push(self, doc: dict, *, expect_version: int | None = None,
                   audit: dict | None = None) -> int:
        """Validate `doc` and store it as the next version; returns that version.

        Raises GraphInvalid (store unchanged), VersionConflict when `expect_version` is given
        and the store holds another version, StoreUnavailable when Redis cannot be reached.
        """
        # The store owns version and epoch; validation ignores whatever the doc says of them.
        stored = stored_form(doc) if isinstance(doc, dict) else doc
        parse_graph(stored, version=1)
        data = orjson.dumps(stored)
        digest = doc_digest(data)
        audit_data = orjson.dumps(audit) if audit is not None else b""
        expect_arg = "" if expect_version is None else str(int(expect_version))
        for _ in range(_PUSH_ATTEMPTS):
            with self._mapped("push"):
                raw_version, old_data = await self._get_many(self.version_key, self.doc_key)
            current = self._int(raw_version)
            if expect_version is not None and current != expect_version:
                raise VersionConflict(expect_version, current)
            old = _decode_or_empty(old_data)
            delta = orjson.dumps(diff_docs(old, stored))
            base = doc_digest(old_data) if old_data is not None else ""
            with self._mapped("push"):
                res = await self._push_script(
                    keys=[self.doc_key, self.version_key, self.epoch_key, self.deltas_key,
                          self.audit_key],
                    args=[expect_arg, current, data, delta, base, digest,
                          secrets.token_hex(8), DELTA_STREAM_MAXLEN, audit_data,
                          AUDIT_STREAM_MAXLEN, self.channel])
            status = res[0].decode()
            if status == "ok":
                return int(res[1])
            if status == "conflict":
                raise VersionConflict(expect_version if expect_version is not None else current,
                                      int(res[1]))
            # "moved": another writer got in between our read and the script; recompute.
        raise StoreUnavailable(
            f"redis store {self.safe_url}: push gave up after {_PUSH_ATTEMPTS} attempts; "
            "other writers keep moving the version")

    async def _get_many(self, *keys: str) -> list[bytes | None]:
        """GET of several keys of the graph, atomically (one script: on a cluster it goes to
        the slot's node like any command, following MOVED after a resharding)."""
        res = await self._read_script(keys=list(keys))
        # a missing key comes back as nil (RESP2) or false (RESP3)
        return [v if isinstance(v, bytes) else None for v in res]

    def _int(self, raw: bytes | None) -> int:
        if raw is None:
            return 0
        try:
            return int(raw)
        except ValueError:
            raise StoreUnavailable(
                f"redis store {self.safe_url}: {self.version_key} holds {raw[:40]!r}, "
                "not an integer") from None


def _decode_or_empty(data: bytes | None) -> dict:
    """The previous stored doc for diffing; {} when absent or unreadable (full delta)."""
    if data is None:
        return {}
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}
