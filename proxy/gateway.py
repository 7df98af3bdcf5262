"""Gateway mode wiring: the edge. The stage list, top to bottom."""

from __future__ import annotations

import ssl

from .config import ProxyConfig
from .runtime import Listener, Runtime
from .stages.context import gateway_fallback, make_context
from .stages.policy import load_key, make_policy
from .stages.route import make_gateway_route
from .stages.sanitize import make_sanitize


def build_gateway(rt: Runtime) -> list[tuple[Listener, str]]:
    cfg: ProxyConfig = rt.config
    cell = rt.cell

    def default_env(req) -> str:
        return cfg.default_env or cell.current.graph.baseline

    prefixes = []
    for spec in cfg.route_prefix:
        prefix, _, service = spec.partition("=")
        prefixes.append((prefix.encode(), service))
    stages = [
        make_sanitize(max_header_count=cfg.max_header_count, strip_internal=True,
                      trusted_peers=frozenset(cfg.trusted_proxies)),
        make_context(max_hops=cfg.max_hops, max_baggage_bytes=cfg.max_baggage_bytes,
                     max_baggage_members=cfg.max_baggage_members, default_env=default_env,
                     fallback=gateway_fallback(host_suffix=(cfg.env_host_suffix or "").encode() or None)),
        make_policy(cell, policy=cfg.context_policy, allow=frozenset(_split_list(cfg.context_allow)),
                    key=load_key(cfg.env_token_key), default_env=default_env),
        make_gateway_route(cell, prefixes),
    ]
    tls = None
    if cfg.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return [(Listener(rt, "gateway", stages, tls=tls), cfg.listen)]


def _split_list(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]
