"""Layered config: the effective value of a key for an env is the nearest setting in its chain."""

from __future__ import annotations

from typing import Any

from .model import Graph

# Route keys the proxy reads, per service: `<svc>.<key>`; defaults apply when no env sets them.
ROUTE_DEFAULTS = {"timeout_ms": 15000, "idle_timeout_ms": 60000, "retries": 1}


def explain_config(graph: Graph, chain: tuple[str, ...]) -> dict[str, tuple[Any, str]]:
    """key -> (value, env that sets it), walking `chain` from the env up to the baseline."""
    out: dict[str, tuple[Any, str]] = {}
    for name in chain:
        for key, value in graph.envs[name].config.items():
            out.setdefault(key, (value, name))
    return dict(sorted(out.items()))


def route_settings(effective: dict[str, tuple[Any, str]], service: str) -> dict[str, Any]:
    """The proxy's per-service route settings with defaults filled in."""
    return {
        key: effective.get(f"{service}.{key}", (default, None))[0]
        for key, default in ROUTE_DEFAULTS.items()
    }
