"""The request path compiled with mypyc (setup.py) and its switch back to the sources
(STAX_PURE=1): what runs is what was asked for, and both serve requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.conftest import ROOT, stale_compiled_modules
from tests.servers import running_gateway, write_graph

HOT_PATH = re.findall(r'"(proxy/[a-z_/]+\.py)"', (ROOT / "setup.py").read_text())


def _loaded(env: dict) -> dict:
    """Where each HOT_PATH module is loaded from in a new process, and proxy.compiled()."""
    modules = [p[:-3].replace("/", ".") for p in HOT_PATH]
    code = ("import importlib, json, proxy\n"
            f"files = {{m: importlib.import_module(m).__file__ for m in {modules!r}}}\n"
            "print(json.dumps({'compiled': proxy.compiled(), 'files': files}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_hot_path_lists_real_modules():
    assert len(HOT_PATH) >= 10
    assert all((ROOT / p).is_file() for p in HOT_PATH), HOT_PATH
    assert "proxy/server_protocol.py" in HOT_PATH and "proxy/stages/forward.py" in HOT_PATH


def test_the_build_is_whole_or_absent():
    """Every HOT_PATH module compiled, or none: a partial build would mix the two."""
    env = {k: v for k, v in os.environ.items() if k != "STAX_PURE"}
    found = _loaded(env)
    kinds = {f.endswith(".py") for f in found["files"].values()}
    assert len(kinds) == 1, found["files"]
    assert found["compiled"] is (kinds == {False})


def test_stax_pure_runs_the_sources():
    found = _loaded({**os.environ, "STAX_PURE": "1"})
    assert found["compiled"] is False
    for module, path in found["files"].items():
        assert path.endswith(".py") and path.startswith(str(ROOT / "proxy")), (module, path)


async def test_a_gateway_serves_the_same_compiled_or_interpreted(tmp_path, upstreams):
    """The same request through a real gateway process, in the default build and with
    STAX_PURE=1: the same answer and the same route."""
    (up,) = await upstreams("web")
    graph = write_graph(tmp_path / "g.yaml", {"baseline": "base", "envs": {
        "base": {"services": {"web": {"endpoints": [up.addr]}}}}})
    seen = []
    for pure in ("0", "1"):
        async with running_gateway(graph, env={**os.environ, "STAX_PURE": pure}) as (_, port, _admin):
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{port}/x?q=1", data=b"abc" * 1000,
                                  headers={"Host": "web", "baggage": "stax.env=base,k=v"}) as r:
                    body = await r.json()
                    seen.append((r.status, r.headers["x-stax-route"], body["path"], body["body"],
                                 body["headers"]["x-stax-env"], body["headers"]["baggage"]))
    assert seen[0] == seen[1], seen
    assert seen[0] == (200, "web=local:base@v1", "/x?q=1", "abc" * 1000, "base", "stax.env=base,k=v")


def test_stale_compiled_modules_are_found(tmp_path):
    pkg = tmp_path / "proxy" / "stages"
    pkg.mkdir(parents=True)
    for name in ("fresh", "edited"):
        (pkg / f"{name}.py").write_text("")
        (pkg / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    past = time.time() - 60
    os.utime(pkg / "fresh.py", (past, past))
    os.utime(pkg / "edited.cpython-311-x86_64-linux-gnu.so", (past, past))
    assert stale_compiled_modules(tmp_path) == ["proxy/stages/edited.py"]
    assert stale_compiled_modules(ROOT) == []  # this run's own build is current (or absent)


@pytest.mark.parametrize("env, said", [({"CC": "/nonexistent/cc"}, "no C compiler"), ({"STAX_PURE": "1"}, "")])
def test_setup_builds_without_the_extension_when_asked_or_unable(env, said):
    """No compiler, or STAX_PURE=1: setup.py asks for no extension (the sources run)."""
    code = ("import sys, setuptools\n"
            "setuptools.setup = lambda **kw: print(len(kw['ext_modules']))\n"
            "sys.argv = ['setup.py']\n"
            "exec(open('setup.py').read())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
    assert said in out.stderr
