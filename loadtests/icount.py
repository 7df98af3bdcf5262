"""`python -m loadtests.icount`: the Python cost of one request, counted in instructions.

On a shared VM, req/s and CPU µs per request move by more than most code changes (the bench's
spread column). This drives stax's real request path in-process: the real client and upstream
protocols, httptools, the stages, metrics, with in-memory transports instead of sockets. So it
measures exactly what stax's code costs and nothing of the kernel. Under
`valgrind --tool=callgrind` it counts the instructions of N requests (the run with N minus the
run with none, so start-up cancels out): the same build gives the same count, whatever else
the machine is doing. Compare two trees by running this in each. Without valgrind it prints
only the in-process time per request (best of 5), which is as noisy as the machine.

    python -m loadtests.icount                    # gateway, 5,000 requests
    python -m loadtests.icount --mode sidecar     # the sidecar's egress listener
    python -m loadtests.icount --mode floor       # the featureless Python floor, for reference
    python -m loadtests.icount --functions 20     # bytecodes and calls per request, by function
    python -m loadtests.icount --rotate 10000     # the bench's 10,000-env graph, each request
                                                  # naming the next of its envs (see below)
    python -m loadtests.icount --rotate 10000 --reloads 25   # the same after 25 graph changes
    STAX_PURE=1 python -m loadtests.icount        # the sources interpreted, not the compiled path

--functions counts the bytecodes of the sources: with the request path compiled, it runs itself
again with STAX_PURE=1.
    python -m loadtests.icount --footprint        # L1 data misses per request by L1 size

--rotate N drives the bench's N-env graph (loadtests/common.py big_graph) with requests that
rotate over all its envs, as the bench's `10k-env` cell does. Its instructions per request are
those of three envs; what it shows is memory: run it under cachegrind with a last-level cache
of the size of a core's L2 to count the misses per request of data no recent request touched
(loadtests/README.md, "Rotating over 10,000 envs").
--reloads K (with --rotate) first makes K graph changes as the bench's rewriter does, each
published as the file source publishes one (its answers carried over), with rotating requests
between them: what a reload leaves the requests after it (loadtests/README.md, "Checked: what
else a reload leaves behind").

Tracing with an exporter is measured by the bench (`--targets stax-gateway-otlp,...`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

from proxy import compiled

from .bench.load import TRACEPARENT
from .common import big_graph, env_names, move_overlay, small_graph

UPSTREAM = "127.0.0.1:8000"  # never dialled: the driver hands the pool a connected fake
REQUEST = (b"GET /small HTTP/1.1\r\nHost: bench\r\nbaggage: stax.env=baseline,userId=bench\r\n"
           b"traceparent: " + TRACEPARENT.encode() + b"\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 04:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
            b"hello, world\n")


class LoopRound:
    """Stands in for the loop under the Outbox: the driver ends each round by running what
    was scheduled (in the proxy, uvloop runs it once its I/O callbacks are done)."""

    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, callback) -> None:
        self.ready.append(callback)

    def end(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


class MemoryTransport:
    """What the protocols call on a transport, keeping the last write to check."""

    def __init__(self) -> None:
        self.last = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.last = data

    def writelines(self, parts) -> None:
        self.last = b"".join(parts)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, key: str, default=None):
        return ("127.0.0.1", 40000) if key == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close


def floor_pair() -> tuple:
    """The Python floor (loadtests/bare_protocol_proxy.py: httptools, no features) wired to
    in-memory transports: (client protocol, upstream protocol, client transport, upstream one)."""
    from .bare_protocol_proxy import Client, Upstream

    client_t, upstream_t = MemoryTransport(), MemoryTransport()
    client = Client(("127.0.0.1", 8000))
    client.transport = client_t  # not connection_made: that would dial the upstream
    client.upstream = Upstream(client)
    client.upstream.connection_made(upstream_t)
    return client, client.upstream, client_t, upstream_t, LoopRound(), None


def stax_pair(mode: str, doc: dict) -> tuple:
    """stax's client and upstream protocols, the stages and metrics of `mode` on the graph
    `doc`, wired to in-memory transports, the upstream connection idle in the pool; and the
    Runtime (its snapshot cell: --reloads)."""
    from proxy.config import ProxyConfig
    from proxy.gateway import build_gateway
    from proxy.runtime import Runtime
    from proxy.server_protocol import ClientConnection
    from proxy.sidecar import build_sidecar
    from proxy.upstream_protocol import UpstreamConnection
    from resolver.sources.file import load_file

    extra = {"env": "baseline", "service": "bench", "app": UPSTREAM} if mode == "sidecar" else {}
    with tempfile.TemporaryDirectory(prefix="stax-icount-") as tmp:  # read once, here
        graph = Path(tmp) / "graph.json"
        graph.write_text(json.dumps(doc))
        cfg = ProxyConfig(mode=mode, graph=str(graph), **extra)
        rt = Runtime(cfg)
        rt.cell.publish(load_file(cfg.graph))
    listeners = build_gateway(rt) if mode == "gateway" else build_sidecar(rt)
    listener = listeners[-1][0]  # the gateway's one, or the sidecar's egress
    client_t, upstream_t = MemoryTransport(), MemoryTransport()
    client = ClientConnection(listener, b"http")
    client.connection_made(client_t)
    endpoint = rt.cell.current.resolve("baseline", "bench").endpoints[0]
    upstream = UpstreamConnection(rt.pool, endpoint.address)
    upstream.connection_made(upstream_t)
    rt.pool.active += 1
    rt.pool.release(upstream)  # now idle in the pool, where the first request finds it
    loop_round = listener.forwarder.outbox.loop = LoopRound()
    return client, upstream, client_t, upstream_t, loop_round, rt


def warmed(mode: str, rotate: int = 0, reloads: int = 0):
    """One request through the pair of `mode`, as a function, after 2,000 of them (with
    `rotate`, on the `rotate`-env graph, each request naming the next env, after two rounds;
    with `reloads`, that many graph changes as the bench's rewriter makes, half a round of
    requests after each and two rounds more)."""
    doc = big_graph(UPSTREAM, envs=rotate) if rotate else small_graph(UPSTREAM)
    client, upstream, client_t, upstream_t, loop_round, rt = floor_pair() if mode == "floor" else stax_pair(mode, doc)
    heads = [REQUEST.replace(b"stax.env=baseline", b"stax.env=" + env.encode()) for env in env_names(doc)] if rotate else [REQUEST]
    turn = [0]

    def one() -> None:
        client.data_received(REQUEST)
        loop_round.end()
        upstream.data_received(RESPONSE)

    def next_one() -> None:  # the same and a turn of the rotation (kept apart: icount's count)
        i = turn[0]
        turn[0] = i + 1 if i + 1 < len(heads) else 0
        client.data_received(heads[i])
        loop_round.end()
        upstream.data_received(RESPONSE)

    if rotate:
        one = next_one

    for _ in range(max(2000, 2 * len(heads))):  # warm: memoized routes and context, specialised bytecode
        one()
    if reloads:
        reload(rt.cell, doc, reloads, lambda: [one() for _ in range(len(heads) // 2)])
        if rt.cell.version != 1 + reloads:
            raise SystemExit(f"the graph is at v{rt.cell.version} after {reloads} reloads, not v{1 + reloads}")
        for _ in range(2 * len(heads)):
            one()
    # Freeze what exists, as the proxy does on each graph publish: a collection walking it
    # during the counted requests (rare in production) would land in one run's count only.
    gc.collect()
    gc.freeze()
    upstream_t.last = client_t.last = b""  # the check is of a request made now, not the first
    env = env_names(doc)[turn[0]].encode()  # the env the next request names
    one()
    if ((b"x-stax-env: " + env + b"\r\n" not in upstream_t.last and mode != "floor")
            or not upstream_t.last.startswith(b"GET /small ") or not client_t.last.startswith(b"HTTP/1.1 200")):
        raise SystemExit(f"the driver's request did not go through:\n{upstream_t.last!r}\n{client_t.last!r}")
    return one


def reload(cell, doc: dict, times: int, between) -> None:
    """`times` changes of `doc` (a big_graph), the bench's Rewriter's (move_overlay), each
    published as the file source does: the snapshot built from the previous one with the
    changed env named, its answers carried over. `between()` after each."""
    from resolver.sync import build_snapshot_from_doc

    for n in range(1, times + 1):
        changed = move_overlay(doc, n)
        cell.publish(build_snapshot_from_doc(doc, version_if_unset=cell.version + 1, source="icount",
                                             previous=(doc, cell.current), changed=changed))
        between()


async def drive(mode: str, requests: int, timed: bool, rotate: int = 0, reloads: int = 0) -> float | None:
    one = warmed(mode, rotate, reloads)
    best = None
    if timed:
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(requests):
                one()
            took = (time.perf_counter() - t0) / requests * 1e6
            best = took if best is None else min(best, took)
    else:
        for _ in range(requests):
            one()
    return best


async def bytecodes(mode: str, requests: int) -> dict:
    """Bytecodes executed and Python calls made per request, by function (sys.settrace with
    opcode events: exact and repeatable, and it needs no valgrind). The driver's own function
    and the memory transport's methods are counted too, as in the instruction count."""
    one = warmed(mode)
    ops: dict[str, int] = {}
    calls: dict[str, int] = {}
    names: dict = {}  # code object -> "file:qualname"

    def tracer(frame, event, arg):
        code = frame.f_code
        name = names.get(code)
        if name is None:
            name = names[code] = f"{Path(code.co_filename).name}:{code.co_qualname}"
        if event == "call":
            calls[name] = calls.get(name, 0) + 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            ops[name] = ops.get(name, 0) + 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(requests):
            one()
    finally:
        sys.settrace(None)
    rows = sorted(((n, ops.get(n, 0) / requests, calls[n] / requests) for n in calls), key=lambda r: -r[1])
    return {"bytecodes_per_request": sum(ops.values()) / requests,
            "python_calls_per_request": sum(calls.values()) / requests,
            "functions": [{"function": n, "bytecodes": b, "calls": c} for n, b, c in rows]}


def _valgrind(args, requests: int, tool: list[str], counter: str) -> int:
    """Run the driver for `requests` requests under valgrind `tool`; the count `counter` matched."""
    cmd = ["valgrind", *tool, sys.executable, "-m", "loadtests.icount", "--inner", "--requests",
           str(requests), "--mode", args.mode, "--rotate", str(args.rotate), "--reloads", str(args.reloads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "PYTHONHASHSEED": "0"})  # same hashes, same probes
    found = re.search(counter, out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def callgrind_total(args, requests: int) -> int:
    return _valgrind(args, requests, ["--tool=callgrind", "--callgrind-out-file=/dev/null"],
                     r"Collected : (\d+)")


FOOTPRINT_KIB = (32, 64, 128, 256)


def footprint(args) -> dict[int, float]:
    """L1 data-cache misses per request with a simulated L1 of each size in FOOTPRINT_KIB
    (cachegrind; N requests minus none, like the instruction count). The request's data
    footprint is about the size where they fall to nearly none. Under load the kernel's network
    work evicts L1 and L2 between requests, so what a request touches is fetched again each
    time: a request touching less costs less than its instruction count says."""
    def misses(kib: int, requests: int) -> int:
        tool = ["--tool=cachegrind", "--cache-sim=yes", f"--D1={kib * 1024},8,64",
                "--LL=33554432,16,64", "--cachegrind-out-file=/dev/null"]
        return _valgrind(args, requests, tool, r"D1  misses:\s+([\d,]+)")

    runs = [(kib, n) for kib in FOOTPRINT_KIB for n in (0, args.requests)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # independent valgrind processes
        counts = dict(zip(runs, pool.map(lambda run: misses(*run), runs), strict=True))
    return {kib: (counts[kib, args.requests] - counts[kib, 0]) / args.requests for kib in FOOTPRINT_KIB}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.icount", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--mode", choices=["gateway", "sidecar", "floor"], default="gateway",
                    help="floor: the featureless Python proxy the bench measures, for reference")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--functions", type=int, metavar="N", default=0,
                    help="instead: bytecodes and Python calls per request, the top N functions")
    ap.add_argument("--footprint", action="store_true",
                    help="instead: L1 data misses per request at simulated L1 sizes (needs valgrind)")
    ap.add_argument("--rotate", type=int, metavar="N", default=0,
                    help="the bench's N-env graph, each request naming the next of its envs (gateway, sidecar)")
    ap.add_argument("--reloads", type=int, metavar="K", default=0,
                    help="with --rotate: count after K graph changes (one overlay moved each), as the bench's after-reloads cell")
    ap.add_argument("--inner", action="store_true",
                    help="only drive the requests (the run under valgrind; for a valgrind tool of your own)")
    args = ap.parse_args(argv)
    if args.rotate and (args.mode == "floor" or args.functions):
        raise SystemExit("--rotate drives stax (gateway or sidecar) and counts instructions or misses")
    if args.reloads and not args.rotate:
        raise SystemExit("--reloads changes the graph of --rotate N (the bench's big graph)")
    if args.inner:
        uvloop.run(drive(args.mode, args.requests, timed=False, rotate=args.rotate, reloads=args.reloads))
        return 0
    if args.functions:
        if compiled():  # compiled code runs no bytecodes: count those of its sources, interpreted
            return subprocess.run([sys.executable, "-m", "loadtests.icount", *(sys.argv[1:] if argv is None else argv)],
                                  env={**os.environ, "STAX_PURE": "1"}).returncode
        prof = uvloop.run(bytecodes(args.mode, min(args.requests, 1000)))  # traced: ~100x slower
        prof["functions"] = prof["functions"][:args.functions]
        if args.json:
            print(json.dumps({"mode": args.mode, **prof}))
            return 0
        print(f"{prof['bytecodes_per_request']:,.0f} bytecodes and {prof['python_calls_per_request']:.0f} "
              f"Python calls per request ({args.mode})\n bytecodes  calls  function")
        for row in prof["functions"]:
            print(f"{row['bytecodes']:10.1f} {row['calls']:6.1f}  {row['function']}")
        return 0
    if args.footprint:
        if not shutil.which("valgrind"):
            raise SystemExit("--footprint needs valgrind (apt-get install valgrind)")
        curve = footprint(args)
        if args.json:
            print(json.dumps({"mode": args.mode, "requests": args.requests,
                              "l1d_misses_per_request": {str(k): v for k, v in curve.items()}}))
            return 0
        print(f"L1 data misses per request ({args.mode}, cachegrind, {args.requests:,} requests minus none)")
        for kib, m in curve.items():
            print(f"  L1 {kib:4d} KiB: {m:8,.0f}")
        return 0
    us = uvloop.run(drive(args.mode, args.requests, timed=True, rotate=args.rotate, reloads=args.reloads))
    result = {"mode": args.mode, "requests": args.requests, "compiled": compiled(), "rotate": args.rotate,
              "reloads": args.reloads,
              "us_per_request_in_process": us, "instructions_per_request": None}
    if shutil.which("valgrind"):
        base = callgrind_total(args, 0)
        result["instructions_per_request"] = (callgrind_total(args, args.requests) - base) / args.requests
    if args.json:
        print(json.dumps(result))
        return 0
    what = "the Python floor" if args.mode == "floor" else (
        f"stax {args.mode} ({'compiled' if result['compiled'] else 'interpreted'})")
    if args.rotate:
        what += f", rotating over {args.rotate:,} envs"
    if args.reloads:
        what += f" after {args.reloads} reloads"
    print(f"{what}: {us:.2f} µs per request in-process (best of 5 x {args.requests:,}; as noisy as the machine)")
    if result["instructions_per_request"] is None:
        print("valgrind is not installed (apt-get install valgrind): no instruction count")
    else:
        print(f"{what}: {result['instructions_per_request']:,.0f} instructions per request "
              f"(callgrind, {args.requests:,} requests minus none: repeatable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
