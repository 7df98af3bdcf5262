"""Sanitize: one pass over the head that enforces framing rules and picks out stax's headers.

Runs first, before anything trusts the request. Request-smuggling defences live here:
one unambiguous body framing or a 400.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from resolver.errors import BadRequest, HeadersTooLarge, MethodNotAllowed

from ..memo import remember
from ..request import HOP_BY_HOP, Request
from .path import needs_normalizing, normalize_path

# Final: mypyc compiles these to constants, not a module dict look-up per use
_HOST: Final = 0
_BAGGAGE: Final = 1
_ENV: Final = 2
_TRACEPARENT: Final = 3
_HOPS: Final = 4
_CONTENT_LENGTH: Final = 5
_TRANSFER_ENCODING: Final = 6
_CONNECTION: Final = 7
_UPGRADE: Final = 8
_COOKIE: Final = 9
_XFF: Final = 10
_XFP: Final = 11
_EXPECT: Final = 12
_KINDS: Final = {
    b"host": _HOST, b"baggage": _BAGGAGE, b"x-stax-env": _ENV, b"traceparent": _TRACEPARENT,
    b"x-stax-hops": _HOPS, b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING, b"connection": _CONNECTION, b"upgrade": _UPGRADE,
    b"cookie": _COOKIE, b"x-forwarded-for": _XFF, b"x-forwarded-proto": _XFP, b"expect": _EXPECT,
}


_NOT_DROPPABLE: Final = frozenset({b"close", b"keep-alive", b"upgrade", b"host"})


class TrustedPeers:
    """Peers whose X-Forwarded-* headers are kept: addresses and networks (`10.0.0.0/8`).
    `peer in trusted` is asked only of requests that carry those headers."""

    def __init__(self, specs=()) -> None:
        networks = []
        for spec in specs:
            try:
                networks.append(ipaddress.ip_network(spec, strict=False))
            except ValueError:
                raise ValueError(f"{spec!r} is not an IP address or network") from None
        self.networks = tuple(networks)
        self._seen: dict[str, bool] = {}  # client addresses: bounded (proxy.memo)

    def __contains__(self, peer: str) -> bool:
        hit = self._seen.get(peer)
        if hit is None:
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                hit = False
            else:
                hit = any(ip in net for net in self.networks)
            remember(self._seen, peer, hit)
        return hit


def make_sanitize(*, max_header_count: int, strip_internal: bool, trusted_peers: TrustedPeers,
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
        forwarded = False  # X-Forwarded-* present: only a trusted peer's are kept
        for name, _, value in headers:
            kind = _KINDS.get(name)  # one dict probe for the many headers stax ignores
            if kind is None:
                if strip_internal and name[:7] == b"x-stax-":
                    drop = True
            elif kind == _HOST:
                if req.host is not None and value != req.host:
                    raise BadRequest("more than one Host header")
                req.host = value
            elif kind == _TRACEPARENT:
                if req.h_traceparent is not None and value != req.h_traceparent:
                    value = b""  # two different ones: neither is believed, a new trace starts
                req.h_traceparent = value
            elif kind == _BAGGAGE:
                if req.h_baggage is None:
                    req.h_baggage = [value]
                else:
                    req.h_baggage.append(value)
            elif kind == _ENV:
                if req.h_env is not None and value != req.h_env:
                    raise BadRequest("conflicting x-stax-env headers")
                req.h_env = value
            elif kind == _HOPS:
                if req.h_hops is not None and value != req.h_hops:
                    raise BadRequest("conflicting x-stax-hops headers")
                req.h_hops = value
            elif kind == _CONTENT_LENGTH:
                if not value.isdigit() or (content_length is not None and value != content_length):
                    raise BadRequest("invalid or conflicting Content-Length")
                content_length = value
            elif kind == _TRANSFER_ENCODING:
                te = value if te is None else te + b"," + value
            elif kind == _CONNECTION:
                tokens = {t.strip().lower() for t in value.split(b",")} - {b""}
                conn_upgrade = conn_upgrade or b"upgrade" in tokens
                if b"keep-alive" in tokens:
                    req.echo_keep_alive = True
                # Host stays whatever Connection names: HTTP/1.1 requires it upstream
                named = tokens - _NOT_DROPPABLE
                if named:
                    req.hop_names = req.hop_names | named
            elif kind == _UPGRADE:
                upgrade = value
            elif kind == _COOKIE:
                req.h_cookie = value if req.h_cookie is None else req.h_cookie + b"; " + value
            elif kind == _XFF:
                req.h_xff = value if req.h_xff is None else req.h_xff + b", " + value
                forwarded = True
            elif kind == _XFP:
                req.h_xfp = value
                forwarded = True
            elif kind == _EXPECT:
                if value.lower() == b"100-continue":
                    req.expect_continue = True
        if conn_upgrade and upgrade:
            req.upgrade = upgrade
        if te is not None:
            if content_length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if te != b"chunked" and b"".join(te.split()).lower() != b"chunked":
                # only chunked alone: other codings (gzip, chunked) would reach the upstream
                # re-framed as plain chunked, their meaning lost
                raise BadRequest("unsupported Transfer-Encoding (only chunked)")
            req.chunked = True
        elif content_length is not None:
            req.content_length = int(content_length)
        if drop or (forwarded and strip_internal and req.peer not in trusted_peers):
            _strip_untrusted(req, trusted_peers)
        path = req.path
        if path[:1] == b"/" and needs_normalizing(path):
            req.path = normalize_path(path)

    return sanitize


def _strip_untrusted(req: Request, trusted_peers: TrustedPeers) -> None:
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


__all__ = ["make_sanitize", "HOP_BY_HOP", "TrustedPeers"]
