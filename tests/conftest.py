"""Shared fixtures: graphs, real upstream servers, free ports. redis-server lives in redis_fixture."""

from __future__ import annotations

import pytest  # noqa: F401

pytest_plugins = ["tests.redis_fixture", "tests.servers"]
