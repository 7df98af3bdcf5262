"""Gateway mode wiring: the edge. The stage list, top to bottom."""

from __future__ import annotations

from .config import ProxyConfig, edge_tls
from .listener import Listener
from .runtime import Runtime
from .stages.context import gateway_fallback, make_context
from .stages.policy import load_key, make_policy
from .stages.route import make_gateway_route
from .stages.sanitize import TrustedPeers, make_sanitize


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
                      trusted_peers=TrustedPeers(cfg.trusted_proxies)),
        make_context(max_hops=cfg.max_hops, max_baggage_bytes=cfg.max_baggage_bytes,
                     max_baggage_members=cfg.max_baggage_members, default_env=default_env,
                     fallback=gateway_fallback(host_suffix=(cfg.env_host_suffix or "").encode() or None)),
        make_policy(cell, policy=cfg.context_policy, allow=frozenset(cfg.context_allow),
                    key=load_key(cfg.env_token_key), default_env=default_env),
        make_gateway_route(cell, prefixes),
    ]
    return [(Listener(rt, "gateway", stages, tls=edge_tls(cfg)), cfg.listen)]
