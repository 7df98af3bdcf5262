"""Shared fixtures: graphs, real upstream servers, free ports. redis-server lives in redis_fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.redis_fixture", "tests.servers"]

ROOT = Path(__file__).resolve().parents[1]


def stale_compiled_modules(root: Path = ROOT) -> list[str]:
    """Sources edited since their compiled module was built: Python would still run the
    compiled one, so the tests would test old code."""
    stale = []
    for so in sorted(root.joinpath("proxy").rglob("*.so")):
        source = so.with_name(so.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(source.relative_to(root)))
    return stale


def pytest_sessionstart(session) -> None:
    stale = [] if os.environ.get("STAX_PURE") == "1" else stale_compiled_modules()
    if stale:
        pytest.exit(f"the compiled request path is older than {', '.join(stale)}: run `make build` "
                    "(or set STAX_PURE=1 to test the sources interpreted)", returncode=4)
