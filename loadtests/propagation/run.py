"""`python -m loadtests.propagation`: how long a graph change takes to reach every proxy.

Starts one redis-server on a free port, pushes a graph with RedisStore, starts N stax
gateways with `--redis` (no request traffic), then makes one-overlay changes and reports, per
change, the time from the write to each proxy serving the new version, as p50/p99/max across
the proxies, plus the CPU each proxy spent per change. The write's time is its commit in
Redis: the millisecond of the delta-stream entry id that the push script's XADD assigned
(Redis's clock, the same host clock the proxies log by). Not when RedisStore.push returned:
the script publishes before it replies, so a proxy can serve the change before the writer
hears back. Two ways to timestamp the serving, neither adds code to the proxy:

  --via log     (default) each proxy's own "graph vN serving" log line: stamped in the proxy
                when it swaps the snapshot, 1 ms resolution; proxies run --log-level info,
                which logs only graph events here (no request traffic, no access log).
  --via readyz  poll every proxy's /readyz concurrently every ~2 ms from one asyncio client
                (proxies at --log-level warning); the resolution is the poll window, reported.
                The polling itself costs the proxies CPU while they build the new snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis

from resolver.sources.redis_store import RedisStore

from ..common import big_graph, cpu_seconds, free_port, spawn, stax_bin, stop, wait_port

SERVING = "serving ("  # in "graph v%s serving (%s envs, from %s)", logged by SnapshotCell.publish


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (with 20 proxies, p99 is the slowest but one... or the max)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))]


class Proxy:
    def __init__(self, tmp: Path, i: int, url: str, prefix: str, level: str) -> None:
        self.port, self.admin = free_port(), free_port()
        self.log = tmp / f"proxy-{prefix.strip(':')}-{i}.log"
        self.offset = 0
        self.proc = spawn([stax_bin(), "gateway", "--redis", url, "--redis-prefix", prefix,
                           "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin}",
                           "--log-level", level], core=None, log=self.log)

    def served_at(self, version: int) -> float | None:
        """Wall-clock time of this proxy's 'graph v<version> serving' line, if logged yet."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        want = f"graph v{version} {SERVING}"
        for line in data.splitlines():
            if b'"ts"' not in line:
                continue
            rec = json.loads(line)
            if rec.get("msg", "").startswith(want):
                return dt.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=dt.UTC).timestamp()
        return None


async def committed_at(r: aioredis.Redis, store: RedisStore, version: int) -> float:
    """When `version` was committed, from its delta-stream entry id (`<ms>-<seq>`, given by
    Redis inside the push script): a time in seconds, floored to the millisecond."""
    ((entry_id, fields),) = await r.xrevrange(store.deltas_key, count=1)
    if int(fields[b"version"]) != version:
        raise AssertionError(f"newest delta is v{fields[b'version'].decode()}, not v{version}")
    return int(entry_id.split(b"-")[0]) / 1000


async def readyz(session: aiohttp.ClientSession, p: Proxy) -> dict:
    async with session.get(f"http://127.0.0.1:{p.admin}/readyz") as r:
        return await r.json()


async def wait_ready(session, proxies: list[Proxy], version: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(proxies)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} proxies not at v{version} after {timeout}s")
        still = []
        for p in pending:
            if p.proc.poll() is not None:
                raise RuntimeError(f"proxy on :{p.port} exited; see {p.log}")
            try:
                if (await readyz(session, p)).get("graph_version", 0) < version:
                    still.append(p)
            except (aiohttp.ClientError, OSError):
                still.append(p)
        pending = still
        await asyncio.sleep(0.2)


async def by_log(proxies: list[Proxy], version: int, t_write: float, timeout: float) -> tuple[list, float]:
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(proxies):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)}/{len(proxies)} proxies logged v{version}")
        for i, p in enumerate(proxies):
            if i not in seen and (at := p.served_at(version)) is not None:
                seen[i] = at
        await asyncio.sleep(0.01)
    for p in proxies:
        p.offset = p.log.stat().st_size
    # both stamps are floored to the millisecond: round away float noise, not milliseconds
    return [round((seen[i] - t_write) * 1000, 3) for i in range(len(proxies))], 1.0


async def by_readyz(session, proxies: list[Proxy], version: int, t_write: float,
                    interval: float, timeout: float) -> tuple[list, float]:
    async def one(p: Proxy) -> tuple[float, float]:
        deadline = time.time() + timeout
        sent_before = t_write
        while time.time() < deadline:
            sent = time.time()
            if (await readyz(session, p)).get("graph_version", 0) >= version:
                got = time.time()
                return (got - t_write) * 1000, (got - sent_before) * 1000
            sent_before = sent
            await asyncio.sleep(interval)
        raise TimeoutError(f"proxy on :{p.port} not at v{version} after {timeout}s")

    res = await asyncio.gather(*(one(p) for p in proxies))
    return [r[0] for r in res], statistics.median(r[1] for r in res)


async def run_size(tmp: Path, url: str, envs: int, args) -> dict:
    prefix = f"stax-prop-{envs}:"
    doc = big_graph("127.0.0.1:9", envs=envs, services=min(50, max(5, envs)),
                    teams=max(1, min(100, envs // 10)))
    store = RedisStore(url, prefix=prefix)
    r = aioredis.from_url(url)
    proxies: list[Proxy] = []
    level = "info" if args.via == "log" else "warning"
    try:
        version = await store.push(doc)
        log(f"{envs} envs: pushed v{version} ({len(orjson.dumps(doc)) / 1e6:.2f} MB); "
            f"starting {args.proxies} gateways (--log-level {level})")
        proxies = [Proxy(tmp, i, url, prefix, level) for i in range(args.proxies)]
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
            for p in proxies:
                wait_port(p.admin, timeout=120, proc=p.proc)
            await wait_ready(s, proxies, version, timeout=300)
            await asyncio.sleep(1.0)  # let start-up settle (first polls, pub/sub subscribed)
            for p in proxies:
                p.offset = p.log.stat().st_size
            changes = []
            names = [n for n in doc["envs"] if n != doc["baseline"]]
            for k in range(args.changes):
                env = names[(k * 7919) % len(names)]
                overlay = doc["envs"][env]["services"]
                service = sorted(overlay)[0]
                overlay[service] = {"endpoints": [f"10.253.{k // 250}.{k % 250 + 1}:8080"]}
                pids = [p.proc.pid for p in proxies]
                cpu0 = cpu_seconds(pids)
                version = await store.push(doc, expect_version=version)
                t_acked = time.time()
                t_write = await committed_at(r, store, version)
                if args.via == "log":
                    lat, resolution = await by_log(proxies, version, t_write, args.timeout)
                else:
                    lat, resolution = await by_readyz(s, proxies, version, t_write,
                                                      args.interval, args.timeout)
                await asyncio.sleep(0.5)  # the change's follow-up work (cache, polls) lands
                cpu_ms = (cpu_seconds(pids) - cpu0) * 1000 / len(proxies)
                for p in proxies:  # every proxy agrees on the version it serves
                    got = (await readyz(s, p))["graph_version"]
                    if got != version:
                        raise AssertionError(f"proxy on :{p.port} serves v{got}, not v{version}")
                changes.append({"version": version, "env": env, "service": service,
                                "ms": sorted(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                                "max_ms": max(lat), "cpu_ms_per_proxy": cpu_ms,
                                "resolution_ms": resolution,
                                "writer_ack_ms": round((t_acked - t_write) * 1000, 3)})
                log(f"  change {k + 1}: v{version} ({env}/{service}) p50 {pct(lat, 50):.0f} ms, "
                    f"max {max(lat):.0f} ms, {cpu_ms:.0f} ms CPU per proxy")
                await asyncio.sleep(args.gap)
    finally:
        for p in proxies:
            p.proc.terminate()
        for p in proxies:
            stop(p.proc)
        await store.close()
        await r.aclose()
    every = [ms for c in changes for ms in c["ms"]]
    return {"envs": len(doc["envs"]), "graph_bytes": len(orjson.dumps(doc)), "changes": changes,
            "all": {"p50_ms": pct(every, 50), "p99_ms": pct(every, 99), "max_ms": max(every),
                    "cpu_ms_per_proxy": statistics.median(c["cpu_ms_per_proxy"] for c in changes),
                    "resolution_ms": max(c["resolution_ms"] for c in changes)}}


def table(results: list[dict], args) -> str:
    out = [f"graph propagation: {args.proxies} stax gateways and redis-server on {os.cpu_count()} "
           f"cores, no request traffic, timestamps via {args.via}",
           f"{'graph':>11}  {'change':>6}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  "
           f"{'CPU ms/proxy':>12}  {'resolution':>10}"]
    for r in results:
        rows = [(str(i + 1), c) for i, c in enumerate(r["changes"])] + [("all", r["all"])]
        for label, c in rows:
            out.append(f"{r['envs']:>6} envs  {label:>6}  {c['p50_ms']:>7.1f}  {c['p99_ms']:>7.1f}  "
                       f"{c['max_ms']:>7.1f}  {c['cpu_ms_per_proxy']:>12.1f}  "
                       f"{format(c['resolution_ms'], '.1f') + ' ms':>10}")
    out.append(f"Every proxy shares {os.cpu_count()} cores with the other {args.proxies - 1} and "
               "Redis, so the slowest proxies wait for CPU: with a core each, a proxy's time is "
               "close to its CPU ms per change.")
    return "\n".join(out)


async def amain(args) -> int:
    if shutil.which("redis-server") is None:
        log("redis-server is not installed (apt-get install redis-server)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="stax-prop-"))
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    try:
        wait_port(port, proc=redis)
        url = f"redis://127.0.0.1:{port}/0"
        for envs in args.sizes:
            results.append(await run_size(tmp, url, envs, args))
    finally:
        stop(redis)
    print(table(results, args))
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent.parent / "results"
                                           / time.strftime("propagation-%Y%m%d-%H%M%S.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({"proxies": args.proxies, "via": args.via, "cores": os.cpu_count(),
                                  "results": results}, option=orjson.OPT_INDENT_2))
    print(f"JSON: {out}")
    with contextlib.suppress(OSError):
        shutil.rmtree(tmp)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.propagation",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--proxies", type=int, default=20)
    ap.add_argument("--changes", type=int, default=5, help="one-overlay changes per graph size")
    ap.add_argument("--sizes", default="10,10000", help="graph sizes in envs, comma-separated")
    ap.add_argument("--via", choices=["log", "readyz"], default="log")
    ap.add_argument("--interval", type=float, default=0.002, help="readyz poll interval (s)")
    ap.add_argument("--gap", type=float, default=1.0, help="pause between changes (s)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="5 proxies, 2 changes, 10 and 1,000 envs")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.proxies, args.changes, args.sizes = 5, 2, "10,1000"
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return asyncio.run(amain(args))
