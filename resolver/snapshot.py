"""Immutable snapshot of one graph version with memoized resolution.

Resolution is a pure function of (snapshot, env, service). The first look-up of a pair walks
the chain once and stores a Route; every later look-up is two dictionary gets. Building a
snapshot therefore costs only validation, even for 10,000 envs.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

from .errors import BadContext, NoProvider, UnknownEnv
from .layered_config import RouteSettings, explain_config, route_settings
from .model import Endpoint, Graph
from .validate import excerpt, valid_name


class Route:
    """Where requests for `service` go (`kind` at `provider_env`), with the route settings of
    the requesting env's chain. One object per distinct resolution in a snapshot, shared by
    every env that resolves that way: 10,000 envs inheriting a service from the baseline hold
    one Route, not 10,000, so memory grows with the graph's overlays, not with the (env,
    service) pairs requested. The env asking is the request's (`req.env`), never the route's."""

    # What every request reads comes first, in one or two cache lines: with 10,000 envs in
    # rotation the Route of each is cold, and every line touched costs a miss
    __slots__ = (
        "picks", "rr", "timeout_s", "line", "stats", "budget",
        "service", "kind", "provider_env", "endpoints", "version", "settings", "header",
        "idle_timeout_s", "retries",
    )

    def __init__(self, service: str, kind: str, provider_env: str | None,
                 endpoints: tuple[Endpoint, ...], version: int, settings: RouteSettings) -> None:
        self.service, self.kind, self.provider_env = service, kind, provider_env
        self.endpoints, self.settings = endpoints, settings
        self._label(version)  # version, header (x-stax-route entry), line (the response's, when alone)
        self.timeout_s = _seconds(settings.timeout_ms)
        self.idle_timeout_s = _seconds(settings.idle_timeout_ms)
        self.retries = settings.retries
        # Weighted round-robin as one turn of picks (unweighted: the overlay's own tuple); the
        # proxy's cursor (shared by the envs using this route: they call the same endpoints),
        # metrics and budget cells live here too (mutable, but only ever touched by the
        # proxy's one event loop).
        picks = self.picks = endpoints if all(e.weight == 1 for e in endpoints) else _spread(endpoints)
        # a fresh answer starts its turn at a random pick, as Envoy's and gRPC's do: every proxy
        # meets a graph change with the same fresh answers, and started at the first pick they
        # would all send their next requests to the same endpoint
        self.rr = random.randrange(len(picks)) if len(picks) > 1 else 0
        self.stats: Any = None  # the proxy's metric cells for this route
        self.budget: Any = None  # the proxy's retry-budget cell for this service

    def __repr__(self) -> str:
        return f"<Route {self.header.decode()} endpoints={len(self.endpoints)}>"

    def _label(self, version: int) -> None:
        self.version = version
        self.header = _header(self.service, self.kind, self.provider_env, version)
        self.line = b"x-stax-route: " + self.header + b"\r\n"

    def relabelled(self, version: int) -> Route:
        """This answer, unchanged, as graph `version`'s (shared_route's `kept`): a copy, so that a
        request in flight on the previous graph still reports that graph's version. Its
        round-robin cursor and the proxy's cells go on where this one's are."""
        new = object.__new__(Route)
        new.picks, new.rr, new.timeout_s, new.stats, new.budget = (
            self.picks, self.rr, self.timeout_s, self.stats, self.budget)
        new.service, new.kind, new.provider_env, new.endpoints, new.settings = (
            self.service, self.kind, self.provider_env, self.endpoints, self.settings)
        new.idle_timeout_s, new.retries = self.idle_timeout_s, self.retries
        new._label(version)
        return new


def _spread(endpoints: tuple[Endpoint, ...], most: int = 10000) -> tuple[Endpoint, ...]:
    """One turn of weighted round-robin: each endpoint `weight` times, spread over the turn as
    evenly as the weights allow (3:1 gives a a c a, not a a a c), so that a few requests, from
    wherever the cursor stands, already get near their shares. Weights beyond `most` in all
    are scaled down (none of those above 0 to 0)."""
    weights = [e.weight for e in endpoints]
    total = sum(weights)
    if total > most:
        weights = [max(1, w * most // total) if w else 0 for w in weights]
    # endpoint i's k-th pick falls at (k + 1/2) / weight of the turn; ties go in listed order
    order = sorted(((k + 0.5) / w, i) for i, w in enumerate(weights) for k in range(w))
    return tuple(endpoints[i] for _, i in order)


_SECONDS: dict[float, float] = {}


def _seconds(ms: float) -> float:
    """ms / 1000 as one float object per value: the Routes of 10,000 envs share it, so reading
    it costs no cache miss of its own."""
    seconds = _SECONDS.get(ms)
    if seconds is None:
        if len(_SECONDS) >= 1024:  # a graph's settings take a few values; stay bounded anyway
            _SECONDS.clear()
        seconds = _SECONDS[ms] = ms / 1000
    return seconds


def shared_route(table: dict, service: str, kind: str, provider: str | None,
                 endpoints: tuple[Endpoint, ...], version: int, settings: RouteSettings,
                 kept: Route | None = None) -> Route:
    """The one Route of `table` (a snapshot's) for this answer, made on first use: every env
    that resolves alike shares it. `kept`: the previous snapshot's Route for this answer, which
    a reload carries over relabelled (its round-robin turn and the proxy's cells go on: made
    afresh, a quiet service sent every request to its first endpoint while the graph changed
    elsewhere between its requests)."""
    key = (service, kind, provider, settings)
    route = table.get(key)
    if route is None:
        route = table[key] = (Route(service, kind, provider, endpoints, version, settings)
                              if kept is None else kept.relabelled(version))
    return route


def _header(service: str, kind: str, provider_env: str | None, version: int) -> bytes:
    where = "shared" if kind == "shared" else f"{kind}:{provider_env}"
    return f"{service}={where}@v{version}".encode()


_SERIALS = itertools.count(1)


class Snapshot:
    def __init__(self, graph: Graph, *, source: str = "", previous: Snapshot | None = None,
                 changed: frozenset | None = None) -> None:
        self.graph = graph
        self.version = graph.version
        # unique per snapshot, even where two share a version: what a cache of its answers is
        # keyed by without holding the snapshot (proxy/stages/context.py Parsed)
        self.serial = next(_SERIALS)
        self.source = source
        self.created = time.time()
        # service -> env -> Route: the memo. The proxy's route stage reads it directly (a
        # method call costs more than the two look-ups) and calls resolve() on a miss.
        self.memo: dict[str, dict[str, Route]] = {}
        self._shared: dict[tuple, Route] = {}  # see shared_route
        self._chains: dict[str, tuple[str, ...]] = {}
        # the previous snapshot and the envs that changed since, until carry_steps() is done
        self._carry_from = (previous, changed) if previous is not None and changed is not None else None

    def __repr__(self) -> str:
        cached = sum(len(r) for r in self.memo.values())
        return (f"<Snapshot v{self.version} envs={len(self.graph.envs)} cached_routes={cached} "
                f"routes={len(self._shared)} source={self.source}>")

    # -- the hot path ------------------------------------------------------------------------
    def resolve(self, env: str, service: str) -> Route:
        try:
            return self.memo[service][env]
        except KeyError:
            return self._resolve_slow(env, service)

    def carry_steps(self, step: int = 100):
        """Carry over the previous snapshot's answers, yielding every `step` of them: after a
        change to the envs in `changed` only, an answer for an env whose chain holds none of
        them is still right, and becomes this snapshot's (its Route, relabelled: shared_route).

        SnapshotCell.install publishes first and runs this behind, on the event loop, in
        slices short enough for request p99; a request for a pair it has not reached yet is
        carried on the spot (_resolve_slow). Carried only on first requests, a reload of
        10,000 envs cost the loop 6-8 µs a pair (60-77 ms, a 10-25% dip in the first seconds
        of rotating traffic); carried before publishing, it held a new graph back for seconds
        on a saturated loop with a big memo; in the build thread it held the GIL long enough
        to double request p99."""
        if self._carry_from is None:
            return
        previous, changed = self._carry_from
        done = 0
        # copies: the previous snapshot may still memoize (requests in flight) while this yields
        for service, envs in list(previous.memo.items()):
            mine = self.memo.setdefault(service, {})  # the dict _remember fills
            for env, old in envs.copy().items():  # a copy, not 10,000 tuples for the collector
                if env not in mine:  # not yet carried by a request
                    self._carry(env, service, old, previous, changed)
                done += 1
                if done % step == 0:
                    yield
        self._carry_from = None  # the previous snapshot is let go

    def _carry(self, env: str, service: str, old: Route, previous: Snapshot,
               changed: frozenset) -> Route | None:
        """`old`, previous's answer for (env, service), as this snapshot's, if still right."""
        chain = previous._chains.get(env)
        if chain is None or not changed.isdisjoint(chain):
            return None
        self._chains[env] = chain
        return self._remember(env, service, old.kind, old.provider_env, old.endpoints,
                              old.settings, kept=old)

    # -- memoized slow path ------------------------------------------------------------------
    def chain(self, env: str) -> tuple[str, ...]:
        """env, parent(env), ..., baseline. Raises BadContext / UnknownEnv."""
        chain = self._chains.get(env)
        if chain is None:
            envs = self.graph.envs
            if env not in envs:
                if not valid_name(env):  # what the proxy answers a request naming it (CLI, admin)
                    raise BadContext(f"invalid env name {excerpt(env)}")
                raise UnknownEnv(f"unknown env {env!r} (graph v{self.version})")
            names, node = [], env
            while node is not None:  # validated: reaches the baseline, no cycles
                names.append(node)
                node = envs[node].parent
            chain = self._chains[env] = tuple(names)
        return chain

    def config(self, env: str) -> dict[str, tuple[Any, str]]:
        """Every config key in env's chain with its value and the env setting it (CLI)."""
        return explain_config(self.graph, self.chain(env))

    def _resolve_slow(self, env: str, service: str) -> Route:
        if self._carry_from is not None:  # published, its carry not done (carry_steps)
            previous, changed = self._carry_from
            envs = previous.memo.get(service)
            old = envs.get(env) if envs is not None else None
            if old is not None:
                route = self._carry(env, service, old, previous, changed)
                if route is not None:
                    return route
        graph = self.graph
        chain = self.chain(env)
        if service in graph.shared:
            kind, provider, endpoints = "shared", None, graph.shared[service].endpoints
        else:
            for depth, name in enumerate(chain):
                overlay = graph.envs[name].services.get(service)
                if overlay is not None:
                    kind = "local" if depth == 0 else ("baseline" if name == graph.baseline else "ancestor")
                    provider, endpoints = name, overlay.endpoints
                    break
            else:
                if service not in graph.services:
                    raise NoProvider(f"no provider for service {service!r}: not a service in graph v{self.version}")
                raise NoProvider(
                    f"no provider for service {service!r} in env {env!r}: searched {' -> '.join(chain)}"
                )
        return self._remember(env, service, kind, provider, endpoints,
                              route_settings(graph, chain, service))

    def _remember(self, env: str, service: str, kind: str, provider: str | None,
                  endpoints: tuple[Endpoint, ...], settings: RouteSettings,
                  kept: Route | None = None) -> Route:
        route = shared_route(self._shared, service, kind, provider, endpoints, self.version,
                             settings, kept)
        self.memo.setdefault(service, {})[env] = route
        return route

    # -- explanations (CLI, /debug/resolve) --------------------------------------------------
    def explain(self, env: str, service: str) -> dict:
        """The `stax resolve --json` shape. Raises BadContext / UnknownEnv / NoProvider."""
        route = self.resolve(env, service)
        chain = self.chain(env)
        searched = () if route.kind == "shared" else chain[: chain.index(route.provider_env) + 1]
        steps = []
        for name in searched:
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
