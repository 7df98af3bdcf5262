"""A tiny demo service for the stax deploy examples: Python standard library only.

GET /healthz answers 200. Any other GET answers JSON: which service and env instance
answered, the env the request carried, and for each service named in DEMO_CALLS what the call
to it returned. Those calls go to `http://<service>/...` and reach the sidecar's egress
because HTTP_PROXY points at it (urllib honours HTTP_PROXY and NO_PROXY). The app forwards
the context headers it received, as OpenTelemetry auto-instrumentation would: without them
the egress would route the call with the sidecar's own env instead of the request's.

Settings (environment): DEMO_SERVICE, DEMO_ENV, DEMO_PORT (8000), DEMO_CALLS (comma-separated
service names), DEMO_BIND (0.0.0.0).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = os.environ.get("DEMO_SERVICE", "demo")
ENV = os.environ.get("DEMO_ENV", "")
CALLS = [s.strip() for s in os.environ.get("DEMO_CALLS", "").split(",") if s.strip()]
FORWARD = ("baggage", "traceparent", "tracestate", "x-stax-hops")
_OPENER = urllib.request.build_opener()  # with a ProxyHandler built from HTTP_PROXY/NO_PROXY


def call(service: str, headers: dict) -> dict:
    req = urllib.request.Request(f"http://{service}/", headers=headers)
    try:
        with _OPENER.open(req, timeout=5) as resp:
            status, route, body = resp.status, resp.headers.get("x-stax-route"), resp.read()
    except urllib.error.HTTPError as exc:
        status, route, body = exc.code, exc.headers.get("x-stax-route"), exc.read()
    except OSError as exc:  # URLError, timeouts, refused connections
        return {"service": service, "error": str(exc)}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body[:200].decode("utf-8", "replace")
    return {"service": service, "status": status, "route": route, "body": parsed}


_in_flight = 0
_idle = threading.Condition()  # notified whenever a request finishes


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        global _in_flight
        with _idle:
            _in_flight += 1
        try:
            if self.path == "/healthz":
                return self._send(200, {"ok": True})
            fwd = {h: self.headers[h] for h in FORWARD if self.headers.get(h)}
            self._send(200, {
                "service": SERVICE, "instance_env": ENV, "path": self.path,
                "request_env": self.headers.get("x-stax-env"),
                "calls": [call(s, fwd) for s in CALLS],
            })
        finally:
            with _idle:
                _in_flight -= 1
                _idle.notify_all()

    def _send(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # one short line per request
        print(f"{SERVICE}[{ENV}] {self.command} {self.path} {args[1] if len(args) > 1 else ''}",
              flush=True)


def main() -> None:
    server = ThreadingHTTPServer((os.environ.get("DEMO_BIND", "0.0.0.0"),
                                  int(os.environ.get("DEMO_PORT", "8000"))), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{SERVICE}[{ENV}] listening on {server.server_address[0]}:{server.server_address[1]}",
          flush=True)
    server.serve_forever()
    # SIGTERM: no new connections; requests in flight finish (up to 10 s); idle keep-alive
    # connections (the sidecar's pool) just close with the process.
    server.server_close()
    with _idle:
        _idle.wait_for(lambda: _in_flight == 0, timeout=10)


if __name__ == "__main__":
    main()
