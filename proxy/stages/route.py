"""Route: pick the service (mode-specific) and resolve (env, service) on the serving snapshot.

The snapshot reference is read once per request; resolution is a memoized dict look-up.
"""

from __future__ import annotations

import re
from typing import Final

from resolver.errors import BadRequest, MisdirectedRequest, NoGraph, NoProvider, NoRoute
from resolver.layered_config import route_settings
from resolver.model import Endpoint
from resolver.snapshot import Snapshot, shared_route
from resolver.sync import SnapshotCell
from resolver.validate import NAME_RE, excerpt

from ..memo import remember
from ..request import Request
from .path import normalize_path

_SERVICES: Final[dict[bytes, str | None]] = {}  # Host values seen recently: they repeat on every request


def service_from_host(host: bytes | None) -> str | None:
    """First label of the Host header, lowercased, port dropped."""
    if not host:
        return None
    try:
        return _SERVICES[host]
    except KeyError:
        pass
    label = host.split(b":", 1)[0].split(b".", 1)[0].lower()
    try:
        service = label.decode("ascii") or None
    except UnicodeDecodeError:
        service = None
    return remember(_SERVICES, host, service, 4096)


def _resolve(cell: SnapshotCell, req: Request, service: str) -> None:
    snap = cell.current
    if snap is None:
        raise NoGraph("no graph loaded yet")
    req.service = service
    env = req.env
    assert env is not None  # the context stage ran
    parsed = req.parsed
    if parsed is not None and parsed.name is not env:  # the env did not come from the baggage
        parsed = None
    if parsed is not None and parsed.serial == snap.serial and parsed.service == service:
        req.route = parsed.route
        return
    envs = snap.memo.get(service)  # resolve()'s hit, inline
    route = envs.get(env) if envs is not None else None
    if route is None:
        try:
            route = snap.resolve(env, service)
        except NoProvider:
            if not NAME_RE.fullmatch(service):
                raise NoProvider(f"{service[:70]!r} is not a service name") from None
            raise
    req.route = route
    if parsed is not None:
        parsed.serial, parsed.service, parsed.route = snap.serial, service, route


def make_gateway_route(cell: SnapshotCell, prefixes: list[tuple[bytes, str]]):
    ordered = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)  # longest match wins

    def route(req: Request) -> None:
        path = req.path
        for prefix, service in ordered:
            if path.startswith(prefix) and (
                len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in b"/?"
            ):
                _resolve(cell, req, service)
                return
        _route_by_host(cell, req, "no Host header and no route prefix matched")

    return route


def _route_by_host(cell: SnapshotCell, req: Request, missing: str) -> None:
    if req.path[:1] != b"/":  # absolute-form: route by its authority, forward origin-form
        _absolute_to_origin(req)
    # the memo's hit inline: one call less per request (None, no Host, is never in it)
    service = _SERVICES.get(req.host)  # type: ignore[arg-type]
    if service is None:
        service = service_from_host(req.host)
        if service is None:
            if req.host:  # there is one, and it names nothing (RFC 9112 3.2: 400)
                raise BadRequest(f"invalid Host header {excerpt(req.host)}")
            raise NoRoute(missing)
    _resolve(cell, req, service)


_AUTHORITY: Final = re.compile(rb"([^/?#]*)(.*)", re.S).match


def _absolute_to_origin(req: Request) -> None:
    target = req.path
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise NoRoute("request target is neither origin-form nor http absolute-form")
    authority, path = _AUTHORITY(rest).groups()  # type: ignore[union-attr]  # always matches: it ends at "/", "?" or "#" (RFC 3986 3.2)
    if b"@" in authority:
        raise NoRoute("userinfo in request target is not allowed")
    req.path = normalize_path(path if path[:1] == b"/" else b"/" + path)
    if req.host is None:
        req.host = authority
        req.headers.append((b"host", b"Host", authority))
    elif service_from_host(req.host) != service_from_host(authority):
        # RFC 9112 3.2.2: the target's authority wins; keep Host consistent with it.
        req.host = authority
        req.headers = [h for h in req.headers if h[0] != b"host"] + [(b"host", b"Host", authority)]


def make_egress_route(cell: SnapshotCell):
    def route(req: Request) -> None:
        _route_by_host(cell, req, "egress request has no Host header and no absolute-form target")

    return route


def make_ingress_route(cell: SnapshotCell, *, env: str, service: str, app: Endpoint):
    """Ingress forwards to the local app; the route entry says how this hop relates to the
    request's env. A request for an env whose chain does not include this sidecar's env is
    refused (421): serving it here would leak it out of its overlay scope."""
    memo: dict = {}  # env -> Route, for the snapshot `memo_of`
    routes: dict = {}  # one Route per distinct answer (shared_route), as in Snapshot
    memo_of: Snapshot | None = None

    def route(req: Request) -> None:
        nonlocal memo_of
        snap = cell.current
        if snap is None:
            raise NoGraph("no graph loaded yet")
        req.service = service
        if memo_of is not snap:  # kept apart from the env keys: any word is a valid env name
            memo.clear()
            routes.clear()
            memo_of = snap
        assert req.env is not None  # the context stage ran
        found = memo.get(req.env)
        if found is None:
            chain = snap.chain(req.env)  # raises UnknownEnv
            graph = snap.graph
            if service in graph.shared:
                kind, provider = "shared", None
            elif env == req.env:
                kind, provider = "local", env
            elif env not in chain:
                raise MisdirectedRequest(
                    f"this sidecar serves {service} for env {env!r}, which is not in the chain of "
                    f"{req.env!r} ({' -> '.join(chain)})")
            else:
                kind, provider = ("baseline" if env == graph.baseline else "ancestor"), env
            found = memo[req.env] = shared_route(routes, service, kind, provider, (app,), snap.version,
                                                 route_settings(graph, chain, service))
        req.route = found

    return route
