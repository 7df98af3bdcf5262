"""The one stax error tree.

It lives in resolver/ because both the proxy and the control plane depend on the resolver
(and the resolver on nothing of ours). Every error carries its HTTP status and a stable code;
the proxy's single rescue point (proxy/errors.py) turns them into JSON responses.
"""

from __future__ import annotations


class StaxError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code


class BadRequest(StaxError):
    status, code = 400, "bad_request"


class BadContext(StaxError):
    status, code = 400, "bad_context"


class Forbidden(StaxError):
    status, code = 403, "forbidden_context"


class UnknownEnv(StaxError):
    status, code = 404, "unknown_env"


class NoProvider(StaxError):
    status, code = 404, "no_provider"


class NoRoute(StaxError):
    status, code = 404, "no_route"


class MethodNotAllowed(StaxError):
    status, code = 405, "method_not_allowed"


class MisdirectedRequest(StaxError):
    status, code = 421, "misdirected"


class RequestTimeout(StaxError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(StaxError):
    status, code = 413, "payload_too_large"


class HeadersTooLarge(StaxError):
    status, code = 431, "headers_too_large"


class UpstreamUnavailable(StaxError):
    status, code = 502, "upstream_unavailable"


class UpstreamBadResponse(StaxError):
    status, code = 502, "upstream_bad_response"


class NoGraph(StaxError):
    status, code = 503, "no_graph"


class NoHealthyEndpoint(StaxError):
    status, code = 503, "no_healthy_endpoint"


class Overloaded(StaxError):
    status, code = 503, "overloaded"


class UpstreamTimeout(StaxError):
    status, code = 504, "upstream_timeout"


class LoopDetected(StaxError):
    status, code = 508, "loop_detected"


class GraphInvalid(StaxError):
    """A graph document failed validation; `problems` lists every reason found."""

    status, code = 422, "graph_invalid"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    def __reduce__(self):  # crosses a process boundary whole (the file decoder helper)
        return (type(self), (self.problems,))


class VersionConflict(StaxError):
    status, code = 409, "version_conflict"

    def __init__(self, expected: int, actual: int) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"version conflict: expected {expected}, store has {actual}")


class StoreUnavailable(StaxError):
    status, code = 503, "store_unavailable"
