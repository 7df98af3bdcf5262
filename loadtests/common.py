"""Helpers shared by the bench and the propagation test: free ports, child processes pinned
to cores, /proc sampling and the graph generator."""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stax_bin() -> str:
    found = VENV_BIN / "stax"
    return str(found) if found.exists() else (shutil.which("stax") or "stax")


_GIVEN: set[int] = set()


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range: no connect() or bind(0) of any process is
    given one of these, so a port picked here stays free until its listener binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(10000, low - 12000), low)


def free_port() -> int:
    """A free loopback port for a listener started later, never the same one twice in this
    process. Picked below the ephemeral range: a port from bind(0) is one that any outgoing
    connection may take as its source port before the listener binds it (seen in CI)."""
    ports = _below_ephemeral()
    for _ in range(200 if len(ports) >= 1000 else 0):  # else: a kernel tuned to a low range
        port = random.choice(ports)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


_CORES = sorted(os.sched_getaffinity(0))  # read at import, before the bench pins itself


def two_cores() -> bool:
    """Whether proxies and load can be pinned apart (cores 0 and 1 usable, taskset present)."""
    return {0, 1} <= set(_CORES) and shutil.which("taskset") is not None


def spawn(args: list[str], *, core: int | None, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a child (pinned to `core` with taskset when there are two cores), output to `log`."""
    if core is not None and two_cores():
        args = ["taskset", "-c", str(core), *args]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=ROOT)


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (nginx's master and worker, a wrapper and what it runs)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the processes (all their threads), in seconds, from /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # fields 14 and 15 of stat(5)
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads)."""
    return sum(cpu_times(pids))


def core_busy_seconds(core: int) -> float:
    """Time processes ran on one CPU core (user, nice, system; not interrupts), /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                return sum(int(x) for x in line.split()[1:4]) / CLK_TCK
    return 0.0


def memory_kb(pid: int) -> dict[str, int]:
    """A process's VmRSS and VmHWM (its peak), in kB, from /proc/PID/status. Raises OSError
    when it is gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1])
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += memory_kb(pid).get("VmRSS", 0) * 1024
        except OSError:
            continue
    return total


# -- graphs -----------------------------------------------------------------------------------
SMALL_ENVS = ["baseline", "team-a", "feature-1"]


def small_graph(upstream: str) -> dict:
    """Three envs: `bench` resolves baseline/local/ancestor depending on the env."""
    return {
        "baseline": "baseline",
        "shared": {"auth": {"endpoints": ["127.0.0.1:9"]}},
        "envs": {
            "baseline": {"services": {"bench": {"endpoints": [upstream]},
                                      "s01": {"endpoints": ["127.0.0.1:9"]}}},
            "team-a": {"parent": "baseline", "services": {"bench": {"endpoints": [upstream]}}},
            "feature-1": {"parent": "team-a", "services": {"s01": {"endpoints": ["127.0.0.1:9"]}}},
        },
    }


def big_graph(upstream: str, *, envs: int = 10_000, services: int = 50, teams: int = 100,
              overlays: int = 3, seed: int = 7) -> dict:
    """`envs` envs (baseline, `teams` team envs, the rest feature envs under them) and
    `services` services (`bench` plus s01...); the baseline provides every service, each other
    env overlays `overlays` of them (sparse). Every 7th env also overlays `bench`, so requests
    for `bench` resolve local, ancestor or baseline. Every endpoint of `bench` is `upstream`."""
    rnd = random.Random(seed)
    names = ["bench"] + [f"s{i:02d}" for i in range(1, services - 1)]  # + shared auth

    def ep(i: int) -> dict:
        return {"endpoints": [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080"]}

    doc_envs: dict = {"baseline": {"services": {s: ep(i) for i, s in enumerate(names)},
                                   "config": {"bench.timeout_ms": 5000}}}
    doc_envs["baseline"]["services"]["bench"] = {"endpoints": [upstream]}
    for i in range(1, envs):
        if i <= teams:
            name, parent = f"team-{i:03d}", "baseline"
        else:
            name, parent = f"feat-{i:05d}", f"team-{1 + i % teams:03d}"
        svc = {s: ep(i * 8 + k) for k, s in enumerate(rnd.sample(names[1:], overlays))}
        if i % 7 == 0:
            svc["bench"] = {"endpoints": [upstream]}
        env: dict = {"parent": parent, "services": svc}
        if i % 10 == 0:
            env["config"] = {f"{names[1 + i % (len(names) - 1)]}.timeout_ms": 1000 + i}
        doc_envs[name] = env
    return {"baseline": "baseline", "shared": {"auth": {"endpoints": ["10.255.0.1:8080"]}},
            "envs": doc_envs}


def move_overlay(doc: dict, n: int) -> frozenset:
    """The bench's graph change, the n-th: one overlay of `team-001` (a team env of big_graph;
    not `bench`) moved to a new endpoint, in place. The envs it changed."""
    overlay = doc["envs"]["team-001"]["services"]
    service = next(s for s in overlay if s != "bench")
    overlay[service] = {"endpoints": [f"10.254.{n // 250 % 250}.{n % 250 + 1}:8080"]}
    return frozenset({"team-001"})


def env_names(doc: dict) -> list[str]:
    return list(doc["envs"])


def http_get(port: int, path: str, headers: dict, timeout: float = 10) -> tuple[int, dict, bytes]:
    """One GET to 127.0.0.1:port: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tool_version(cmd: list[str]) -> str:
    """The first line a tool prints about its version, or "?"."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout + out.stderr).strip().splitlines()[0][:120]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def parse_metrics(text: str) -> dict:
    """What the harnesses read of a stax /metrics page: requests by mode and code class, local
    errors by code, connections, graph version and sync errors."""
    out: dict = {"requests": {}, "local_errors": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "stax_requests_total":
                mode = out["requests"].setdefault(s.labels["mode"], {})
                cls = s.labels["code_class"]
                mode[cls] = mode.get(cls, 0) + int(s.value)
            elif s.name == "stax_local_errors_total":
                out["local_errors"][s.labels["code"]] = int(s.value)
            elif s.name == "stax_upstream_connections":
                out[f"upstream_{s.labels['state']}"] = int(s.value)
            elif s.name in ("stax_client_connections", "stax_graph_version",
                            "stax_inflight_requests", "stax_graph_sync_errors_total",
                            "stax_graph_rejected_total"):
                out[s.name.removeprefix("stax_")] = int(s.value)
    return out
