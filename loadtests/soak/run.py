"""`python -m loadtests.soak`: a bounded soak through a real chain, a graph push every second.

    wrk (gateway stream) ─► stax gateway ─► stax sidecar ingress ─► upstream (nginx)
    wrk (egress stream, Host: bench) ─► stax sidecar egress ─► sidecar ingress ─► upstream
    RedisStore.push every second ─► redis-server ─► both proxies (--redis: pub/sub + deltas)

Every 5 s it samples each stax process: VmRSS, open fds, CPU time (/proc), client and
upstream connections, request counts by code class and the graph version (/metrics, /readyz).
At the end: a table over time, wrk's totals and a verdict (exit 0 pass, 1 fail):
  errors    0 non-2xx/3xx and 0 socket errors from the first request on (the start, when
            processes come up, ends before load begins: both proxies ready at v1, each stream
            checked with one request per env)
  memory    RSS at the end minus RSS after the warm-up <= --rss-growth-mb, per proxy
  fds       open fds at the end == after the warm-up, +-2 (both taken under load)
  versions  every proxy reaches the last pushed version (within 10 s after the last push)
  processes every process started is still running at the end
Proxies run on core 0, everything else (wrk, nginx, redis-server, this script) on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from resolver.sources.redis_store import RedisStore

from ..bench.targets import nginx_bin, start_upstream
from ..common import ROOT, http_get, stop, tool_version, two_cores, wait_port
from .chain import (
    LOAD_CORE,
    Proxy,
    Stream,
    check_stream,
    log_levels,
    sample_proxy,
    soak_graph,
    start_gateway,
    start_redis,
    start_sidecar,
)

RESULTS = ROOT / "loadtests" / "results"
SAMPLE_EVERY = 5.0
CONVERGE_TIMEOUT = 10.0
FD_SLACK = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=int, default=300, help="seconds of load")
    ap.add_argument("--quick", action="store_true", help="30 s of load (a smoke)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="seconds of load before the reference sample for memory and fds")
    ap.add_argument("--rate", type=float, default=1000,
                    help="gateway stream: target req/s (0: as fast as wrk goes)")
    ap.add_argument("--connections", type=int, default=16, help="gateway stream: connections")
    ap.add_argument("--egress-rate", type=float, default=250, help="egress stream: target req/s")
    ap.add_argument("--egress-connections", type=int, default=4, help="egress stream: connections")
    ap.add_argument("--push-every", type=float, default=1.0, help="seconds between graph pushes")
    ap.add_argument("--rss-growth-mb", type=float, default=20.0,
                    help="largest RSS growth per proxy from the warm-up sample to the end")
    ap.add_argument("--out", help="JSON path (default loadtests/results/soak-<timestamp>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 30
    if args.duration < args.warmup + SAMPLE_EVERY:
        ap.error(f"--duration must be at least --warmup + {SAMPLE_EVERY:.0f} s "
                 f"({args.warmup + SAMPLE_EVERY:.0f})")
    return args


@dataclass
class Pushes:
    first: int = 0
    last: int = 0
    done: int = 0
    failed: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # how long each push took


async def push_loop(store: RedisStore, ingress: str, t0: float, end: float, every: float,
                    state: Pushes) -> None:
    """Push graph 1, 2, ... at t0 + every, t0 + 2*every, ... up to `end` (monotonic)."""
    step = 1
    loop = asyncio.get_running_loop()
    while t0 + step * every <= end:
        await asyncio.sleep(max(0.0, t0 + step * every - loop.time()))
        started = loop.time()
        try:
            state.last = await store.push(soak_graph(ingress, step))
            state.done += 1
        except Exception as exc:  # the soak records a failed push and goes on
            state.failed.append(f"step {step}: {type(exc).__name__}: {exc}")
        state.seconds.append(loop.time() - started)
        step += 1


async def sample_all(proxies: list[Proxy]) -> dict:
    rows = await asyncio.gather(*(asyncio.to_thread(sample_proxy, p) for p in proxies))
    return {p.name: row for p, row in zip(proxies, rows, strict=True)}


async def wait_ready(proxies: list[Proxy], version: int, timeout: float) -> None:
    for p in proxies:
        wait_port(p.admin, timeout=timeout, proc=p.proc)
    deadline = time.monotonic() + timeout
    for p in proxies:
        while True:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}; see {p.log}")
            row = await asyncio.to_thread(sample_proxy, p)
            if row.get("ready") and (row.get("readyz_version") or 0) >= version:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} not ready at v{version} after {timeout}s: {row}")
            await asyncio.sleep(0.1)


async def converge(proxies: list[Proxy], version: int, timeout: float) -> dict:
    """Poll /readyz until every proxy serves `version`; each proxy's version and when."""
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    out = {p.name: {"version": None, "after_s": None} for p in proxies}
    while True:
        for p in proxies:
            if out[p.name]["after_s"] is not None:
                continue
            try:
                _, _, body = await asyncio.to_thread(http_get, p.admin, "/readyz", {}, 2)
                v = orjson.loads(body).get("graph_version")
            except (OSError, ValueError):
                v = None
            out[p.name]["version"] = v
            if v == version:
                out[p.name]["after_s"] = round(loop.time() - t_start, 3)
        if all(o["after_s"] is not None for o in out.values()) or loop.time() - t_start > timeout:
            return out
        await asyncio.sleep(0.1)


async def soak(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> dict:
    redis_proc, redis_port = start_redis(tmp)
    cleanup.callback(stop, redis_proc)
    wait_port(redis_port, proc=redis_proc)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    upstream = start_upstream(tmp)
    cleanup.callback(upstream.stop)
    store = RedisStore(redis_url)
    try:
        sidecar = start_sidecar(tmp, redis_url, upstream.port)
        cleanup.callback(stop, sidecar.proc)
        ingress = f"127.0.0.1:{sidecar.ports['ingress']}"
        pushes = Pushes()
        pushes.first = pushes.last = await store.push(soak_graph(ingress, 0))
        gateway = start_gateway(tmp, redis_url)
        cleanup.callback(stop, gateway.proc)
        proxies = [gateway, sidecar]
        await wait_ready(proxies, pushes.first, timeout=60)
        problems = (check_stream("gateway", gateway.ports["listen"])
                    + check_stream("egress", sidecar.ports["egress"]))
        if problems:
            raise RuntimeError("the chain does not serve what the soak expects:\n  "
                               + "\n  ".join(problems))
        log(f"start done: redis-server :{redis_port}, upstream {upstream.note} :{upstream.port}, "
            f"sidecar ingress {ingress} egress :{sidecar.ports['egress']}, gateway "
            f":{gateway.ports['listen']}; both ready at v{pushes.first}; each stream checked "
            f"(200, 2 route entries, upstream saw x-stax-hops 2) for every env")

        streams = [Stream("gateway", gateway.ports["listen"], args.connections, args.rate),
                   Stream("egress", sidecar.ports["egress"], args.egress_connections,
                          args.egress_rate)]
        tail = 3  # wrk outlives the last sample, so the end sample is taken under load
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for s in streams:
            s.start(tmp, args.duration + tail, timeout_s=5)
            cleanup.callback(stop, s.proc)
        pusher = asyncio.create_task(push_loop(store, ingress, t0, t0 + args.duration,
                                               args.push_every, pushes))
        samples = []
        times = [k * SAMPLE_EVERY for k in range(int(args.duration // SAMPLE_EVERY) + 1)]
        if times[-1] < args.duration:
            times.append(float(args.duration))
        for t in times:
            await asyncio.sleep(max(0.0, t0 + t - loop.time()))
            row = {"t": round(loop.time() - t0, 2), "pushed": pushes.last,
                   "procs": await sample_all(proxies),
                   "load": all(s.proc.poll() is None for s in streams)}
            samples.append(row)
            log(progress(row, args.duration))
            if not all(r["alive"] for r in row["procs"].values()):
                log("a proxy died: stopping early")
                break
        await pusher
        for s in streams:
            await asyncio.to_thread(s.proc.wait, args.duration + tail + 30)
        convergence = await converge(proxies, pushes.last, CONVERGE_TIMEOUT)
        await asyncio.sleep(2)  # let closed client connections settle
        post = {"t": round(loop.time() - t0, 2), "pushed": pushes.last,
                "procs": await sample_all(proxies), "load": False}
        alive = {p.name: p.alive() for p in proxies}
        alive["upstream"] = upstream.alive()
        alive["redis-server"] = redis_proc.poll() is None
        return {
            "redis_port": redis_port, "upstream": upstream.note, "samples": samples, "post": post,
            "wrk": {s.name: {"connections": s.connections, "target_rps": s.rate, **s.result()}
                    for s in streams},
            "pushes": {"first": pushes.first, "last": pushes.last, "done": pushes.done,
                       "failed": pushes.failed,
                       "max_push_ms": round(max(pushes.seconds, default=0) * 1000, 1)},
            "convergence": convergence, "alive": alive,
            "logs": {p.name: log_levels(p.log) for p in proxies},
        }
    finally:
        await store.close()


# -- report -----------------------------------------------------------------------------------
def progress(row: dict, duration: int) -> str:
    parts = [f"t={row['t']:5.0f}/{duration}s pushed v{row['pushed']}"]
    for name, r in row["procs"].items():
        if not r["alive"]:
            parts.append(f"{name} DEAD")
            continue
        parts.append(f"{name} v{r.get('graph_version')} {r['rss_mb']:.1f} MB {r['fds']} fds")
    return "  ".join(parts)


def _requests(r: dict, mode: str, good: bool | None = None) -> int:
    classes = r.get("requests", {}).get(mode, {})
    if good is None:
        return sum(classes.values())
    return sum(n for cls, n in classes.items() if (cls in ("2xx", "3xx")) == good)


def _bad(r: dict) -> int:
    return sum(_requests(r, mode, good=False) for mode in r.get("requests", {}))


def _cols(r: dict) -> list[str]:
    if not r.get("alive"):
        return ["dead"] + ["-"] * 4
    return [str(r.get("graph_version", "?")), f"{r['rss_mb']:.1f}", str(r["fds"]),
            str(r.get("client_connections", "?")),
            f"{r.get('upstream_active', '?')}/{r.get('upstream_idle', '?')}"]


def _per_s(row: dict, prev: dict | None, name: str, mode: str | None) -> str:
    """Requests per second of one listener (`mode`), or CPU share (mode None), since `prev`."""
    r = row["procs"][name]
    if prev is None or not row["load"] or not r.get("alive") or row["t"] <= prev["t"]:
        return "-"  # the idle row's interval mixes wrk's last seconds with idle time
    before, dt = prev["procs"][name], row["t"] - prev["t"]
    if mode is None:
        return f"{(r['cpu_s'] - before['cpu_s']) / dt:.0%}"
    return f"{(_requests(r, mode) - _requests(before, mode)) / dt:,.0f}"


def table(samples: list[dict], post: dict, warm_t: float) -> str:
    head = ["t s", "pushed", "gw v", "gw RSS MB", "gw fds", "gw cli", "gw up a/i", "gw req/s",
            "gw CPU", "sc v", "sc RSS MB", "sc fds", "sc cli", "sc up a/i", "in req/s",
            "eg req/s", "sc CPU", "non-2xx"]
    lines, prev = [], None
    for row in [*samples, post]:
        procs = row["procs"]
        bad = "-" if prev is None else str(sum(_bad(procs[n]) - _bad(prev["procs"][n])
                                               for n in ("gateway", "sidecar")
                                               if procs[n].get("alive")))
        label = (f"{row['t']:.0f}" + ("*" if row["t"] == warm_t else "")
                 + ("" if row["load"] else " idle"))
        lines.append([label, f"v{row['pushed']}", *_cols(procs["gateway"]),
                      _per_s(row, prev, "gateway", "gateway"), _per_s(row, prev, "gateway", None),
                      *_cols(procs["sidecar"]), _per_s(row, prev, "sidecar", "ingress"),
                      _per_s(row, prev, "sidecar", "egress"), _per_s(row, prev, "sidecar", None),
                      bad])
        prev = row
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.append("gw = stax gateway, sc = stax sidecar; v: graph version served (/metrics); cli: "
               "client connections; up a/i: upstream connections active/idle; req/s and CPU "
               "(one core = 100%) over the interval; in/eg: sidecar ingress/egress; non-2xx: "
               f"counted by the proxies in the interval; * the warm-up sample ({warm_t:.0f} s); "
               "idle: after load stopped (non-2xx: since the last sample under load)")
    return "\n".join(out)


def _other_fds(r: dict) -> int | None:
    """Open fds that are neither client nor upstream connections (listeners, Redis, epoll...):
    what a leak of anything but a connection would move; the pool's size may move the rest."""
    try:
        return r["fds"] - r["client_connections"] - r["upstream_active"] - r["upstream_idle"]
    except (KeyError, TypeError):
        return None


def verdict(res: dict, args: argparse.Namespace) -> tuple[list[dict], float]:
    samples = res["samples"]
    warm = next((s for s in samples if s["t"] >= args.warmup - 0.5), samples[-1])
    end = samples[-1]
    checks = []

    wrk = res["wrk"]
    non2xx = sum(w.get("non2xx", 0) for w in wrk.values())
    sock = sum(w.get("socket_errors", 0) for w in wrk.values())
    total = sum(w.get("requests", 0) for w in wrk.values())
    proxy_bad = sum(_bad(r) for r in res["post"]["procs"].values() if r.get("alive"))
    wrk_ok = all(w["ok"] for w in wrk.values()) and total > 0
    checks.append({
        "check": "errors", "ok": wrk_ok and non2xx == 0 and sock == 0 and proxy_bad == 0,
        "detail": (f"wrk: {non2xx} non-2xx/3xx, {sock} socket errors in {total:,} requests "
                   f"(both streams, from the first request on); the proxies counted "
                   f"{proxy_bad} non-2xx" + ("" if wrk_ok else "; wrk failed"))})

    growth = {}
    for name in ("gateway", "sidecar"):
        w, e = warm["procs"][name], end["procs"][name]
        growth[name] = (e["rss_mb"] - w["rss_mb"]) if w.get("alive") and e.get("alive") else None
    checks.append({
        "check": "memory",
        "ok": all(g is not None and g <= args.rss_growth_mb for g in growth.values()),
        "detail": "RSS at the end minus after the warm-up ({:.0f} s -> {:.0f} s): {} "
                  "(bound <= {:g} MB each)".format(
                      warm["t"], end["t"],
                      ", ".join(f"{n} {'dead' if g is None else format(g, '+.2f') + ' MB'} "
                                f"({warm['procs'][n].get('rss_mb', 0):.2f} -> "
                                f"{end['procs'][n].get('rss_mb', 0):.2f})"
                                for n, g in growth.items()),
                      args.rss_growth_mb)})

    fds = {n: (warm["procs"][n].get("fds"), end["procs"][n].get("fds")) for n in ("gateway", "sidecar")}
    other = {n: (_other_fds(warm["procs"][n]), _other_fds(end["procs"][n])) for n in fds}
    checks.append({
        "check": "fds",
        "ok": all(a is not None and b is not None and abs(b - a) <= FD_SLACK for a, b in fds.values()),
        "detail": "open fds after the warm-up -> at the end (both under load): "
                  + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in fds.items())
                  + f" (bound +-{FD_SLACK}); not client or upstream connections: "
                  + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in other.items())})

    conv = res["convergence"]
    last = res["pushes"]["last"]
    lag = max((s["pushed"] - (r.get("graph_version") or 0) for s in samples
               for r in s["procs"].values() if r.get("alive")), default=0)
    pushes = res["pushes"]
    checks.append({
        "check": "versions",
        "ok": all(c["version"] == last for c in conv.values()) and not pushes["failed"],
        "detail": (f"{pushes['done']} pushes (v{pushes['first']} -> v{last}, every "
                   f"{args.push_every:g} s, {len(pushes['failed'])} failed, slowest "
                   f"{pushes['max_push_ms']:.0f} ms); after the last push: "
                   + ", ".join(f"{n} v{c['version']}"
                               + (f" in {c['after_s']:.1f} s" if c["after_s"] is not None
                                  else f" (not v{last} after {CONVERGE_TIMEOUT:.0f} s)")
                               for n, c in conv.items())
                   + f"; largest lag in a sample: {lag} version(s)")})

    checks.append({"check": "processes", "ok": all(res["alive"].values()),
                   "detail": "running at the end: " + ", ".join(
                       f"{n} {'yes' if a else 'NO'}" for n, a in res["alive"].items())})
    return checks, warm["t"]


def wrk_lines(res: dict) -> list[str]:
    out = []
    for name, w in res["wrk"].items():
        target = f"target {w['target_rps']:,.0f} req/s" if w["target_rps"] else "unpaced"
        if not w["ok"]:
            out.append(f"wrk {name} stream: FAILED (exit {w.get('returncode')}): {w['output'][-500:]}")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in w["socket_error_kinds"].items())
        out.append(f"wrk {name:>7} stream: {w['connections']} conns, {target}: {w['requests']:,} "
                   f"requests ({w['rps']:,.0f} req/s), p50 {w['p50_ms']:.2f} ms, p99 "
                   f"{w['p99_ms']:.2f} ms, max {w['max_ms']:.1f} ms; non-2xx/3xx {w['non2xx']}; "
                   f"socket errors {w['socket_errors']} ({kinds})")
    return out




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("wrk", "redis-server") if shutil.which(t) is None]
    if missing:
        log(f"missing: {', '.join(missing)} (apt-get install {' '.join(missing)})")
        return 2
    if two_cores():
        os.sched_setaffinity(0, {LOAD_CORE})  # wrk, nginx and redis-server inherit core 1
    else:
        log("warning: fewer than two cores (or no taskset): nothing is pinned")
    if nginx_bin() is None:
        log("nginx not found: the upstream is the built-in asyncio one")
    tmp = Path(tempfile.mkdtemp(prefix="stax-soak-"))
    started = time.time()
    log(f"soak: {args.duration} s of load (warm-up {args.warmup} s), a graph push every "
        f"{args.push_every:g} s, samples every {SAMPLE_EVERY:.0f} s; logs in {tmp}")
    try:
        with contextlib.ExitStack() as cleanup:  # stops every process started, whatever happens
            res = asyncio.run(soak(args, tmp, cleanup))
    except (RuntimeError, TimeoutError, OSError) as exc:
        log(f"FAIL: the soak could not run: {exc}\nlogs kept in {tmp}")
        return 1
    checks, warm_t = verdict(res, args)
    passed = all(c["ok"] for c in checks)
    print()
    print(table(res["samples"], res["post"], warm_t))
    print()
    print("\n".join(wrk_lines(res)))
    logs = ", ".join(f"{n}: " + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "nothing")
                     for n, c in res["logs"].items())
    print(f"proxy log lines (--log-level warning): {logs}")
    print()
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']:<9} {c['detail']}")
    env = {"host": platform.node(), "cores": os.cpu_count(), "pinned": two_cores(),
           "python": platform.python_version(), "wrk": tool_version(["wrk", "-v"]),
           "nginx": tool_version([nginx_bin(), "-v"]) if nginx_bin() else None,
           "redis": tool_version(["redis-server", "--version"]), "upstream": res["upstream"]}
    out = Path(args.out) if args.out else RESULTS / time.strftime("soak-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({
        "started": started, "args": vars(args), "environment": env, "passed": passed,
        "checks": checks, "warmup_sample_t": warm_t, **res,
    }, option=orjson.OPT_INDENT_2))
    print(f"\n{'PASS' if passed else 'FAIL'}: {args.duration} s soak; JSON: {out}"
          + ("" if passed else f"; proxy logs kept in {tmp}"))
    if passed:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if passed else 1
