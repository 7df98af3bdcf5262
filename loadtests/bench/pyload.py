"""Fallback load generator when wrk is missing: closed-loop keep-alive connections on uvloop
with httptools. Much slower than wrk, so its numbers are NOT comparable with wrk runs (the
bench labels them so). Prints the same JSON summary line as the wrk script.

    python -m loadtests.bench.pyload SPEC.json -c 64 -d 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httptools
import uvloop

from .load import MARK, LoadSpec


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future | None = None
        self.bytes = 0
        self.status = 0

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


async def _worker(spec: LoadSpec, requests: list[bytes], k: int, until: float, stats: dict) -> None:
    loop = asyncio.get_running_loop()
    transport, conn = await loop.create_connection(_Conn, "127.0.0.1", spec.port)
    pick = random.Random(k).randrange  # a seeded random env per request, as the wrk script
    try:
        while time.monotonic() < until:
            conn.done = loop.create_future()
            t = time.perf_counter()
            transport.write(requests[pick(len(requests))])
            try:
                await conn.done
            except ConnectionError:
                stats["errors"] += 1
                return
            stats["lat"].append(time.perf_counter() - t)
            stats["non2xx"] += not 200 <= conn.status < 300
    finally:
        stats["bytes"] += conn.bytes
        transport.close()


async def run(spec: LoadSpec, connections: int, duration: float) -> dict:
    requests = []
    for env, user in spec.contexts():
        head = "".join(f"{k}: {v}\r\n" for k, v in spec.headers(env, user).items())
        requests.append(f"GET {spec.path} HTTP/1.1\r\n{head}\r\n".encode())
    stats = {"lat": [], "errors": 0, "non2xx": 0, "bytes": 0}
    t0 = time.monotonic()
    await asyncio.gather(*(_worker(spec, requests, k, t0 + duration, stats)
                           for k in range(connections)))
    elapsed = time.monotonic() - t0
    lat = sorted(stats["lat"]) or [0.0]

    def pct(p: float) -> int:
        return int(lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1e6)

    return {"requests": len(stats["lat"]), "duration_us": int(elapsed * 1e6), "bytes": stats["bytes"],
            "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "max_us": int(lat[-1] * 1e6),
            "errors": stats["errors"], "non2xx": stats["non2xx"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("-c", type=int, default=8)
    ap.add_argument("-d", type=float, default=10)
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = LoadSpec(**json.load(f))
    print(MARK + json.dumps(uvloop.run(run(spec, args.c, args.d))), flush=True)


if __name__ == "__main__":
    main()
