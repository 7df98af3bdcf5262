"""Sanitize: one pass over the head that enforces framing rules and picks out stax's headers.

Runs first, before anything trusts the request. Request-smuggling defences live here:
one unambiguous body framing or a 400.
"""

from __future__ import annotations

from resolver.errors import BadRequest, HeadersTooLarge, MethodNotAllowed

from ..request import HOP_BY_HOP, Request
from .path import normalize_path


def make_sanitize(*, max_header_count: int, strip_internal: bool, trusted_peers: frozenset,
                  allow_connect: bool = False):
    def sanitize(req: Request) -> None:
        headers = req.headers
        if len(headers) > max_header_count:
            raise HeadersTooLarge(f"{len(headers)} header fields (limit {max_header_count})")
        if req.method == b"CONNECT" and not allow_connect:
            raise MethodNotAllowed("CONNECT is not supported")
        content_length = None
        te = None
        drop = False
        upgrade = None
        conn_upgrade = False
        for name, _, value in headers:
            if name == b"host":
                if req.host is not None and value != req.host:
                    raise BadRequest("more than one Host header")
                req.host = value
            elif name == b"content-length":
                if not value.isdigit() or (content_length is not None and value != content_length):
                    raise BadRequest("invalid or conflicting Content-Length")
                content_length = value
            elif name == b"transfer-encoding":
                te = value if te is None else te + b"," + value
            elif name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")} - {b""}
                conn_upgrade = conn_upgrade or b"upgrade" in tokens
                if tokens - {b"close", b"keep-alive", b"upgrade"}:
                    req.hop_names = req.hop_names | tokens
            elif name == b"upgrade":
                upgrade = value
            elif name == b"baggage":
                req.h_baggage.append(value)
            elif name == b"x-stax-env":
                if req.h_env is not None and value != req.h_env:
                    raise BadRequest("conflicting x-stax-env headers")
                req.h_env = value
            elif name == b"traceparent":
                req.h_traceparent = value
            elif name == b"x-stax-hops":
                if req.h_hops is not None and value != req.h_hops:
                    raise BadRequest("conflicting x-stax-hops headers")
                req.h_hops = value
            elif name == b"cookie":
                req.h_cookie = value if req.h_cookie is None else req.h_cookie + b"; " + value
            elif name == b"x-forwarded-for":
                req.h_xff = value if req.h_xff is None else req.h_xff + b", " + value
            elif name == b"x-forwarded-proto":
                req.h_xfp = value
            elif name == b"expect":
                if value.lower() == b"100-continue":
                    req.expect_continue = True
            elif strip_internal and name.startswith(b"x-stax-"):
                drop = True
        if conn_upgrade and upgrade:
            req.upgrade = upgrade
        if te is not None:
            if content_length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if te.lower().replace(b" ", b"").split(b",")[-1] != b"chunked":
                raise BadRequest("unsupported Transfer-Encoding")
            req.chunked = True
        elif content_length is not None:
            req.content_length = int(content_length)
        if drop or (strip_internal and req.peer not in trusted_peers and (req.h_xff or req.h_xfp)):
            _strip_untrusted(req, trusted_peers)
        if req.path[:1] == b"/":
            req.path = normalize_path(req.path)

    return sanitize


def _strip_untrusted(req: Request, trusted_peers: frozenset) -> None:
    """Edge only: clients may not set stax's internal headers (env and hops excepted), and
    X-Forwarded-* only from a trusted proxy."""
    trusted = req.peer in trusted_peers
    keep = []
    for h in req.headers:
        name = h[0]
        if name.startswith(b"x-stax-") and name not in (b"x-stax-env", b"x-stax-hops", b"x-stax-env-token"):
            continue
        keep.append(h)
    req.headers = keep
    if not trusted:
        req.h_xff = req.h_xfp = None


__all__ = ["make_sanitize", "HOP_BY_HOP"]
