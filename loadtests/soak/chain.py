"""What the soak runs: redis-server, the upstream (nginx or the built-in one, from the bench),
`stax sidecar` and `stax gateway` with `--redis`, the graph each push stores, the two wrk
streams (a Lua script sets the headers, rotates envs, paces requests and prints a JSON
summary) and the per-process sample (/proc plus the admin port)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.load import SOCKET_ERRORS, LoadSpec, read_summary
from ..bench.targets import SMALL_BODY
from ..common import (
    SMALL_ENVS,
    cpu_seconds,
    free_port,
    http_get,
    parse_metrics,
    rss_bytes,
    small_graph,
    spawn,
    stax_bin,
)

PROXY_CORE, LOAD_CORE = 0, 1
EXTRA_ENV = "soak-extra"


# -- the graph --------------------------------------------------------------------------------
def soak_graph(ingress: str, step: int) -> dict:
    """The graph of push number `step` (0 = the initial one). `bench` is the sidecar's ingress
    in every env that provides it (baseline and team-a; feature-1 inherits it from team-a),
    so every route stays valid. Odd steps add the env `soak-extra`; even steps drop it and set
    baseline's `bench.timeout_ms` to 5000 or 6000 (alternating): consecutive graphs always
    differ, so every push is a real change the proxies apply (as a delta)."""
    doc = small_graph(ingress)
    timeout = 5000 if step % 4 in (0, 1) else 6000
    doc["envs"]["baseline"]["config"] = {"bench.timeout_ms": timeout, "bench.retries": 1}
    if step % 2:
        doc["envs"][EXTRA_ENV] = {"parent": "baseline",
                                  "services": {"bench": {"endpoints": [ingress]}},
                                  "config": {"bench.timeout_ms": 3000 + step % 1000}}
    return doc


# -- processes --------------------------------------------------------------------------------
@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen
    admin: int
    log: Path
    ports: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = spawn([shutil.which("redis-server") or "redis-server", "--port", str(port),
                  "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp),
                  "--loglevel", "warning"], core=LOAD_CORE, log=tmp / "redis.out")
    return proc, port


def start_sidecar(tmp: Path, redis_url: str, upstream: int) -> Proxy:
    ingress, egress, admin = free_port(), free_port(), free_port()
    log = tmp / "stax-sidecar.out"
    proc = spawn([stax_bin(), "sidecar", "--redis", redis_url, "--env", "baseline",
                  "--service", "bench", "--app", f"127.0.0.1:{upstream}",
                  "--listen", f"127.0.0.1:{ingress}", "--egress", f"127.0.0.1:{egress}",
                  "--admin", f"127.0.0.1:{admin}", "--log-level", "warning",
                  "--drain-timeout", "2"], core=PROXY_CORE, log=log)
    return Proxy("sidecar", proc, admin, log, {"ingress": ingress, "egress": egress})


def start_gateway(tmp: Path, redis_url: str) -> Proxy:
    port, admin = free_port(), free_port()
    log = tmp / "stax-gateway.out"
    proc = spawn([stax_bin(), "gateway", "--redis", redis_url, "--listen", f"127.0.0.1:{port}",
                  "--admin", f"127.0.0.1:{admin}", "--log-level", "warning",
                  "--drain-timeout", "2"], core=PROXY_CORE, log=log)
    return Proxy("gateway", proc, admin, log, {"listen": port})


def log_levels(path: Path) -> dict[str, int]:
    """Count a proxy's JSON log lines by level (it runs at --log-level warning)."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            level = json.loads(line).get("level", "?")
        except ValueError:
            level = "unparsed"
        counts[level] = counts.get(level, 0) + 1
    return counts


# -- requests ---------------------------------------------------------------------------------


def check_stream(name: str, port: int) -> list[str]:
    """One request per env through a stream: 200, the whole body, two x-stax-route entries
    (the first stax hop and the sidecar's ingress) and the upstream saw x-stax-hops: 2."""
    problems = []
    spec = LoadSpec(port, "/small")
    for env in SMALL_ENVS:
        status, headers, body = http_get(port, "/small", spec.headers(env))
        route = headers.get("x-stax-route", "")
        if (status != 200 or body != SMALL_BODY.encode() or len(route.split(",")) != 2
                or headers.get("x-seen-hops") != "2" or headers.get("x-seen-env") != env):
            problems.append(f"{name} env={env}: status {status}, route {route!r}, "
                            f"hops {headers.get('x-seen-hops')}, env {headers.get('x-seen-env')}, "
                            f"{len(body)} bytes")
    return problems


def wrk_script(port: int, connections: int, rate: float) -> str:
    """The bench's Lua (Host: bench, baggage stax.env=ENV, one of the three envs at random,
    traceparent, the JSON summary) and, when `rate` > 0, a delay after each response so
    `connections` connections send about `rate` requests per second in all."""
    script = LoadSpec(port, "/small", envs=list(SMALL_ENVS)).lua()
    if rate > 0:
        delay_ms = max(1, round(connections * 1000 / rate))
        script += f"delay = function() return {delay_ms} end\n"
    return script


@dataclass
class Stream:
    name: str
    port: int
    connections: int
    rate: float
    proc: subprocess.Popen | None = None
    out: Path | None = None

    def start(self, tmp: Path, seconds: int, timeout_s: int) -> None:
        script = tmp / f"wrk-{self.name}.lua"
        script.write_text(wrk_script(self.port, self.connections, self.rate))
        self.out = tmp / f"wrk-{self.name}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["wrk", "-t1", f"-c{self.connections}", f"-d{seconds}s", f"--timeout={timeout_s}s",
                 "--latency", "-s", str(script), f"http://127.0.0.1:{self.port}/small"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def result(self) -> dict:
        text = self.out.read_text(errors="replace") if self.out else ""
        res = read_summary(text)
        if res is None:
            return {"ok": False, "output": text[-2000:],
                    "returncode": self.proc.returncode if self.proc else None}
        seconds = res["duration_us"] / 1e6
        return {"ok": True, "requests": res["requests"],
                "rps": res["requests"] / seconds if seconds else 0.0,
                "p50_ms": res["p50_us"] / 1000, "p99_ms": res["p99_us"] / 1000,
                "max_ms": res["max_us"] / 1000, "non2xx": res["non2xx"],
                "socket_errors": res["errors"],
                "socket_error_kinds": {k: res[k] for k in SOCKET_ERRORS}}


# -- sampling ---------------------------------------------------------------------------------
def sample_proxy(p: Proxy) -> dict:
    """RSS, fds and CPU time from /proc; connections, request counts and the graph version
    from /metrics; readiness and the version again from /readyz."""
    row: dict = {"alive": p.alive()}
    if not row["alive"]:
        return row
    row["rss_mb"] = rss_bytes([p.pid]) / 1e6
    try:
        row["fds"] = len(os.listdir(f"/proc/{p.pid}/fd"))
    except OSError:
        row["fds"] = None
    row["cpu_s"] = cpu_seconds([p.pid])
    try:
        _, _, body = http_get(p.admin, "/metrics", {}, timeout=5)
        row.update(parse_metrics(body.decode()))
        status, _, body = http_get(p.admin, "/readyz", {}, timeout=5)
        ready = json.loads(body)
        row["ready"] = status == 200 and ready.get("ready", False)
        row["readyz_version"] = ready.get("graph_version")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        row["admin_error"] = str(exc)
    return row
