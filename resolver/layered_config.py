"""Layered config: the effective value of a key for an env is the nearest setting in its chain."""

from __future__ import annotations

from typing import Any, NamedTuple

from .model import Graph


class RouteSettings(NamedTuple):
    """Route keys the proxy reads, per service (`<svc>.<key>`), with their defaults: what
    applies when no env of the chain sets them."""

    timeout_ms: int = 15000
    idle_timeout_ms: int = 60000
    retries: int = 1


ROUTE_DEFAULTS = RouteSettings()


def explain_config(graph: Graph, chain: tuple[str, ...]) -> dict[str, tuple[Any, str]]:
    """key -> (value, env that sets it), walking `chain` from the env up to the baseline."""
    out: dict[str, tuple[Any, str]] = {}
    for name in chain:
        for key, value in graph.envs[name].config.items():
            out.setdefault(key, (value, name))
    return dict(sorted(out.items()))


def route_settings(graph: Graph, chain: tuple[str, ...], service: str) -> RouteSettings:
    """`service`'s route settings for the env whose chain is `chain`: each key's nearest
    setting in the chain (as explain_config finds it), else its default."""
    values = []
    for key, default in zip(RouteSettings._fields, ROUTE_DEFAULTS, strict=True):
        name = f"{service}.{key}"
        for env in chain:
            config = graph.envs[env].config
            if name in config:
                values.append(config[name])
                break
        else:
            values.append(default)
    return RouteSettings(*values)
