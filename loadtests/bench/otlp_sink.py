"""A minimal OTLP/HTTP trace receiver for the bench: it decodes each export and counts the spans
per URL path (one path per bench target), so the bench can say how many spans a traced stax
really exported, not only what tracing cost. GET /counts returns {path: spans}.

    python -m loadtests.bench.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def make_app() -> web.Application:
    counts: dict[str, int] = {}

    async def export(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        try:
            msg.ParseFromString(await request.read())
        except Exception:  # a bad export is the exporter's bug: say so, as a collector would
            return web.Response(status=400, text="not an ExportTraceServiceRequest")
        spans = sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
        counts[request.path] = counts.get(request.path, 0) + spans
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def get_counts(_: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/counts", get_counts)
    app.router.add_post("/{tail:.*}", export)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
