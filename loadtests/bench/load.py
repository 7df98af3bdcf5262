"""Drive load with wrk (one thread, a Lua script sets the headers and prints a JSON summary),
or with the Python fallback (`pyload`, numbers not comparable with wrk's), while sampling
the measured processes' CPU time and RSS from /proc."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common import core_busy_seconds, cpu_times, rss_bytes

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MARK = "BENCHJSON "

# wrk's summary as one JSON line (bench and soak alike); socket errors by kind, and `non2xx`
# counts responses with a status >= 400.
_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('%s{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,' ..
    '"p90_us":%d,"p99_us":%d,"max_us":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"non2xx":%d}\\n', "MARK", summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
""".replace("MARK", MARK)
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def read_summary(output: str) -> dict | None:
    """The summary line a load run printed (wrk's Lua above, or pyload), or None. `errors`
    is the socket errors in all (pyload reports only that total)."""
    line = next((ln for ln in output.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        return None
    res = json.loads(line[len(MARK):])
    if "errors" not in res:
        res["errors"] = sum(res[k] for k in SOCKET_ERRORS)
    return res


@dataclass
class LoadSpec:
    """One request shape. With `envs`, each request names one of them (baggage stax.env=ENV)
    at random, from a fixed seed: not in turn, since real traffic does not come in the order the
    proxy first met each env, and in that order each env's objects sit next to the last one's
    in memory, where the prefetcher hides what reading them costs (loadtests/README.md, "After
    reloads").

    With `users`, the traffic holds that many distinct baggage values: request value j names
    `envs[j % len(envs)]` and `userId=u<j>`, as real traffic carries per-user members. A 3-env
    graph driven so is as diverse as traffic spread over 10,000 envs (see scale.py)."""

    port: int
    path: str
    host: str = "bench"
    env: str = "baseline"
    envs: list[str] = field(default_factory=list)
    traceparent: bool = True  # False: like a browser at the edge, the proxy starts each trace
    users: int = 0

    def headers(self, env: str, user: str = "bench") -> dict[str, str]:
        out = {"Host": self.host, "baggage": f"stax.env={env},userId={user}"}
        if self.traceparent:
            out["traceparent"] = TRACEPARENT
        return out

    def contexts(self) -> list[tuple[str, str]]:
        """(env, userId) of each distinct request: what both load generators send."""
        envs = self.envs or [self.env]
        if not self.users:
            return [(e, "bench") for e in envs]
        return [(envs[j % len(envs)], f"u{j}") for j in range(self.users)]

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def lua(self) -> str:
        if not self.envs and not self.users:
            sets = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in self.headers(self.env).items())
            return sets + _DONE_LUA
        pairs = ",".join(f'{{"{e}","{u}"}}' for e, u in self.contexts())
        hdr = ', '.join(f'["{k}"] = "{v}"' for k, v in self.headers("ENV", "USER").items())
        hdr = hdr.replace("stax.env=ENV", 'stax.env=" .. c[1] .. "').replace("userId=USER", 'userId=" .. c[2] .. "')
        return f"""local contexts = {{{pairs}}}
local reqs = {{}}
init = function(args)
  math.randomseed(7)
  for j, c in ipairs(contexts) do reqs[j] = wrk.format("GET", nil, {{{hdr}}}) end
end
request = function()
  return reqs[math.random(#reqs)]
end
""" + _DONE_LUA


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_load(spec: LoadSpec, *, connections: int, duration: int, pids: list[int], tmp: Path,
             python_load: bool = False, timeout_s: int = 5, core: int = 0) -> dict:
    """Run one load; returns the summary plus the CPU and peak RSS of `pids` over it, and
    `foreign_cpu`: the share of `core` (the proxy's) that other processes used meanwhile."""
    if python_load or not have_wrk():
        spec_file = tmp / "load-spec.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        cmd = [sys.executable, "-m", "loadtests.bench.pyload", str(spec_file),
               "-c", str(connections), "-d", str(duration)]
        tool = "python"
    else:
        script = tmp / "load.lua"
        script.write_text(spec.lua())
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={timeout_s}s",
               "--latency", "-s", str(script), spec.url()]
        tool = "wrk"
    (user0, kernel0), busy0 = cpu_times(pids), core_busy_seconds(core)
    rss_peak = rss_bytes(pids)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        time.sleep(0.2)
        rss_peak = max(rss_peak, rss_bytes(pids))
    out = proc.stdout.read()
    user1, kernel1 = cpu_times(pids)
    user, kernel = user1 - user0, kernel1 - kernel0
    cpu = user + kernel
    wall = time.monotonic() - t0
    foreign = max(0.0, core_busy_seconds(core) - busy0 - cpu) / wall if pids else None
    res = read_summary(out)
    if proc.returncode != 0 or res is None:
        raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{out[-2000:]}")
    seconds = res["duration_us"] / 1e6
    requests = res["requests"]
    return {
        "tool": tool,
        "requests": requests,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": res["p50_us"] / 1000,
        "p90_ms": res["p90_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "max_ms": res["max_us"] / 1000,
        "errors": res["errors"],
        "non2xx": res["non2xx"],
        "mb_per_s": res["bytes"] / seconds / 1e6 if seconds else 0.0,
        "cpu_s": cpu,
        "cpu_util": cpu / wall if wall else 0.0,
        "foreign_cpu": foreign,
        "cpu_us_per_req": cpu / requests * 1e6 if requests and pids else None,
        # the kernel's share (sockets, scheduling) is about the same for every proxy on one
        # machine and differs most between machines: it is what makes ratios machine-bound
        "user_us_per_req": user / requests * 1e6 if requests and pids else None,
        "kernel_us_per_req": kernel / requests * 1e6 if requests and pids else None,
        "rss_peak_mb": rss_peak / 1e6 if pids else None,
    }
