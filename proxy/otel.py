"""OpenTelemetry spans, only when an exporter is configured (an SDK server span + client
span + inject costs ~50 µs, more than a whole request's budget, so it is off by default).
The standard OTEL_TRACES_SAMPLER variables apply: a request the sampler drops costs one
non-recording server span and no client span.

A server span per request (parent: the incoming traceparent) and a client span per upstream
attempt; the traceparent sent upstream carries the client span, so spans nest across
gateway -> sidecar -> sidecar."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from .tracing import parse_traceparent


class Tracing:
    def __init__(self, provider) -> None:
        self.tracer = provider.get_tracer("stax")

    def server_span(self, req, listener: str):
        # the context stage parsed the incoming traceparent; a request refused before it had
        # run (admission, sanitize, context itself) still joins its caller's trace
        parent = ((req.trace_id, req.parent_id, req.trace_flags) if req.parent_id
                  else parse_traceparent(req.h_traceparent))
        ctx = None
        if parent is not None:
            trace_id, span_id, flags = parent
            ctx = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                int(trace_id, 16), int(span_id, 16), is_remote=True,
                trace_flags=TraceFlags(int(flags, 16)))))
        span = self.tracer.start_span(
            f"stax {listener}", context=ctx, kind=SpanKind.SERVER,
            attributes={"http.request.method": req.method.decode("latin-1"),
                        "url.path": req.path.decode("latin-1")[:256], "stax.listener": listener})
        sc = span.get_span_context()
        req.trace_id = b"%032x" % sc.trace_id
        req.trace_flags = b"%02x" % int(sc.trace_flags)
        if req.route is not None and span.is_recording():
            span.set_attributes(_route_attrs(req.env, req.route))
        return span

    def client_span(self, server_span, env: str, route, endpoint, attempt: int):
        span = self.tracer.start_span(
            f"stax forward {route.service}", context=trace.set_span_in_context(server_span),
            kind=SpanKind.CLIENT,
            attributes={**_route_attrs(env, route), "server.address": endpoint.host,
                        "server.port": endpoint.port, "stax.retry": attempt - 1})
        return span, b"%016x" % span.get_span_context().span_id

    @staticmethod
    def end(span, status: int, error: str | None = None) -> None:
        """End a span with the response status; spans the sampler dropped are left alone."""
        if span is None or not span.is_recording():
            return
        span.set_attribute("http.response.status_code", status)
        if error or status >= 500:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _route_attrs(env: str, route) -> dict:
    return {"stax.env": env, "stax.service": route.service, "stax.kind": route.kind,
            "stax.provider_env": route.provider_env or ""}


def provider_from_config(exporter: str | None):
    """The standard OTEL_TRACES_EXPORTER values this build knows: console, otlp, none."""
    if not exporter or exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "stax"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError("OTEL_TRACES_EXPORTER=otlp needs `pip install "
                             "opentelemetry-exporter-otlp-proto-http`") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"unknown OTEL_TRACES_EXPORTER {exporter!r} (console, otlp, none)")
    return provider
