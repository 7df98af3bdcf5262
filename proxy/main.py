"""Start a proxy process in one mode and run it until SIGTERM/SIGINT drains it."""

from __future__ import annotations

import asyncio

from .config import ProxyConfig
from .runtime import Runtime


async def start(cfg: ProxyConfig, **kw) -> Runtime:
    from .gateway import build_gateway
    from .sidecar import build_sidecar

    rt = Runtime(cfg, **kw)
    build = build_gateway if cfg.mode == "gateway" else build_sidecar
    # Listeners are built after the first graph load so a bad graph file fails the start.
    await rt.start_source()
    listeners = build(rt)
    await rt.start_listeners(listeners)
    return rt


async def serve(cfg: ProxyConfig) -> None:
    rt = await start(cfg)
    rt.install_signals()
    await rt.wait_stopped()


def run(cfg: ProxyConfig) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
