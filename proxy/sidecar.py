"""Sidecar mode wiring: ingress (to the local app) and egress (the app's outbound calls)."""

from __future__ import annotations

from resolver.validate import parse_endpoint

from .config import ProxyConfig
from .listener import Listener
from .runtime import Runtime
from .stages.context import make_context
from .stages.route import make_egress_route, make_ingress_route
from .stages.sanitize import TrustedPeers, make_sanitize


def build_sidecar(rt: Runtime) -> list[tuple[Listener, str]]:
    cfg: ProxyConfig = rt.config
    cell = rt.cell
    own_env = cfg.env

    def default_env(req) -> str:
        return own_env

    def context():
        return make_context(max_hops=cfg.max_hops, max_baggage_bytes=cfg.max_baggage_bytes,
                            max_baggage_members=cfg.max_baggage_members, default_env=default_env)

    def sanitize():
        return make_sanitize(max_header_count=cfg.max_header_count, strip_internal=False,
                             trusted_peers=TrustedPeers())

    app = parse_endpoint(cfg.app)
    ingress = [sanitize(), context(),
               make_ingress_route(cell, env=own_env, service=cfg.service, app=app)]
    egress = [sanitize(), context(), make_egress_route(cell)]
    return [(Listener(rt, "ingress", ingress), cfg.listen),
            (Listener(rt, "egress", egress), cfg.egress)]
