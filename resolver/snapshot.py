"""Immutable snapshot of one graph version with memoized resolution.

Resolution is a pure function of (snapshot, env, service). The first look-up of a pair walks
the chain once and stores a Route; every later look-up is two dictionary gets. Building a
snapshot therefore costs only validation, even for 10,000 envs.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import NoProvider, UnknownEnv
from .layered_config import explain_config, route_settings
from .model import Endpoint, Graph


class Route:
    """Where requests in `env` for `service` go, plus their route settings (from env's chain)."""

    __slots__ = (
        "env", "service", "kind", "provider_env", "endpoints", "version", "header", "line",
        "timeout_s", "idle_timeout_s", "retries", "chain", "picks", "rr", "stats", "budget",
    )

    def __init__(self, env: str, service: str, kind: str, provider_env: str | None,
                 endpoints: tuple[Endpoint, ...], version: int, settings: dict,
                 chain: tuple[str, ...]) -> None:
        self.env, self.service, self.kind = env, service, kind
        self.provider_env, self.endpoints, self.version = provider_env, endpoints, version
        self.chain = chain
        self.header = _header(service, kind, provider_env, version)  # x-stax-route entry
        self.line = b"x-stax-route: " + self.header + b"\r\n"  # the response's, when alone
        self.timeout_s = settings["timeout_ms"] / 1000
        self.idle_timeout_s = settings["idle_timeout_ms"] / 1000
        self.retries = settings["retries"]
        # Weighted round-robin as a flat sequence; the proxy's per-route cursor, metrics and budget
        # cell live here too (mutable, but only ever touched by the proxy's one event loop).
        if all(e.weight == 1 for e in endpoints):
            self.picks = endpoints  # shared with the overlay: one object for every env using it
        else:
            picks = tuple(e for e in endpoints for _ in range(e.weight))
            self.picks = picks if len(picks) <= 10000 else endpoints
        self.rr = 0
        self.stats = None
        self.budget = None  # the proxy's retry-budget cell for this service

    def __repr__(self) -> str:
        return f"<Route {self.header.decode()} env={self.env} endpoints={len(self.endpoints)}>"

    def rebased(self, version: int) -> Route:
        """The same route in a later graph version whose change left its env chain alone."""
        new = Route.__new__(Route)
        new.env, new.service, new.kind = self.env, self.service, self.kind
        new.provider_env, new.endpoints, new.version = self.provider_env, self.endpoints, version
        new.chain, new.header = self.chain, _header(self.service, self.kind, self.provider_env, version)
        new.line = b"x-stax-route: " + new.header + b"\r\n"
        new.timeout_s, new.idle_timeout_s, new.retries = self.timeout_s, self.idle_timeout_s, self.retries
        new.picks, new.rr, new.stats, new.budget = self.picks, 0, self.stats, self.budget
        return new


def _header(service: str, kind: str, provider_env: str | None, version: int) -> bytes:
    where = "shared" if kind == "shared" else f"{kind}:{provider_env}"
    return f"{service}={where}@v{version}".encode()


class Snapshot:
    def __init__(self, graph: Graph, *, source: str = "", previous: Snapshot | None = None,
                 changed: frozenset | None = None) -> None:
        self.graph = graph
        self.version = graph.version
        self.source = source
        self.created = time.time()
        self._routes: dict[str, dict[str, Route]] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._config: dict[str, dict[str, tuple[Any, str]]] = {}
        # After a change to the envs in `changed` only, a route of `previous` whose env chain
        # holds none of them is still right: it is carried over on first use (only its version
        # changes), so a one-overlay reload of 10,000 envs does not re-resolve all of them.
        # Only the memo dicts are kept, never `previous` itself: no chain of old snapshots.
        self._carry = ((previous._routes, previous._chains, changed)
                       if previous is not None and changed is not None else None)

    def __repr__(self) -> str:
        cached = sum(len(r) for r in self._routes.values())
        return f"<Snapshot v{self.version} envs={len(self.graph.envs)} cached_routes={cached} source={self.source}>"

    # -- the hot path ------------------------------------------------------------------------
    def resolve(self, env: str, service: str) -> Route:
        try:
            return self._routes[env][service]
        except KeyError:
            return self._resolve_slow(env, service)

    # -- memoized slow path ------------------------------------------------------------------
    def chain(self, env: str) -> tuple[str, ...]:
        """env, parent(env), ..., baseline. Raises UnknownEnv."""
        chain = self._chains.get(env)
        if chain is None:
            envs = self.graph.envs
            if env not in envs:
                raise UnknownEnv(f"unknown env {env!r} (graph v{self.version})")
            names, node = [], env
            while node is not None:  # validated: reaches the baseline, no cycles
                names.append(node)
                node = envs[node].parent
            chain = self._chains[env] = tuple(names)
        return chain

    def config(self, env: str) -> dict[str, tuple[Any, str]]:
        cfg = self._config.get(env)
        if cfg is None:
            cfg = self._config[env] = explain_config(self.graph, self.chain(env))
        return cfg

    def _resolve_slow(self, env: str, service: str) -> Route:
        if self._carry is not None:
            routes, chains, changed = self._carry
            old = routes.get(env, {}).get(service)
            chain = chains.get(env)
            if old is not None and chain is not None and changed.isdisjoint(chain):
                self._chains[env] = chain
                route = self._routes.setdefault(env, {})[service] = old.rebased(self.version)
                return route
        chain = self.chain(env)
        settings = route_settings(self.config(env), service)
        graph = self.graph
        if service in graph.shared:
            route = Route(env, service, "shared", None, graph.shared[service].endpoints,
                          self.version, settings, ())
        else:
            for depth, name in enumerate(chain):
                overlay = graph.envs[name].services.get(service)
                if overlay is not None:
                    kind = "local" if depth == 0 else ("baseline" if name == graph.baseline else "ancestor")
                    route = Route(env, service, kind, name, overlay.endpoints, self.version,
                                  settings, chain[: depth + 1])
                    break
            else:
                if service not in graph.services:
                    raise NoProvider(f"no provider for service {service!r}: not a service in graph v{self.version}")
                raise NoProvider(
                    f"no provider for service {service!r} in env {env!r}: searched {' -> '.join(chain)}"
                )
        self._routes.setdefault(env, {})[service] = route
        return route

    # -- explanations (CLI, /debug/resolve) --------------------------------------------------
    def explain(self, env: str, service: str) -> dict:
        """The `stax resolve --json` shape. Raises UnknownEnv / NoProvider."""
        route = self.resolve(env, service)
        steps = []
        for name in route.chain:
            provides = name == route.provider_env
            why = (f"{name} overlays {service}" if provides
                   else f"{name} has no overlay of {service}; look in its parent")
            steps.append({"env": name, "provides": provides, "why": why})
        return {
            "env": env,
            "service": service,
            "kind": route.kind,
            "provider_env": route.provider_env,
            "endpoints": [str(e) for e in route.endpoints],
            "graph_version": self.version,
            "chain": steps,
            "route": route.header.decode(),
        }
