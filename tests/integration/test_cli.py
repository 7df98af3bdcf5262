"""The `stax` CLI as a user runs it: real processes, exit codes, JSON shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

GRAPH = "tests/data/graph.yaml"


def stax(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "control.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_validate_ok_and_every_problem(tmp_path):
    ok = stax("graph", "validate", GRAPH)
    assert ok.returncode == 0 and "3 envs" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("baseline: base\nshared: {auth: {endpoints: ['x:1']}}\nenvs:\n"
                   "  base: {services: {auth: {endpoints: ['h:1']}}}\n"
                   "  a: {parent: b}\n  b: {parent: a}\n  c: {parent: ghost}\n"
                   "  D: {parent: base}\n  e: {parent: base, services: {s: {endpoints: []}}}\n"
                   "  f: {parent: base, services: {s: {endpoints: ['nohost']}}}\n")
    out = stax("graph", "validate", str(bad))
    assert out.returncode == 1
    for reason in ("shared and cannot be overlaid", "cycle in parents", "missing parent 'ghost'",
                   "bad env name 'D'", "endpoint list is empty", "malformed endpoint 'nohost'"):
        assert reason in out.stderr, reason


def test_validate_unreadable_file_is_usage_error():
    out = stax("graph", "validate", "/nonexistent/graph.yaml")
    assert out.returncode == 2 and "cannot read" in out.stderr


@pytest.mark.parametrize("env,service,kind,provider,chain", [
    ("feature-1", "web", "local", "feature-1", [("feature-1", True)]),
    ("feature-1", "orders", "ancestor", "team-a", [("feature-1", False), ("team-a", True)]),
    ("team-a", "web", "baseline", "baseline", [("team-a", False), ("baseline", True)]),
    ("feature-1", "auth", "shared", None, []),
])
def test_resolve_json_shape(env, service, kind, provider, chain):
    out = stax("resolve", "--graph", GRAPH, env, service, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"env", "service", "kind", "provider_env", "endpoints", "graph_version", "chain"} <= set(data)
    assert (data["env"], data["service"], data["kind"], data["provider_env"]) == (env, service, kind, provider)
    assert [(c["env"], c["provides"]) for c in data["chain"]] == chain
    assert data["graph_version"] == 1
    assert all(e.startswith("http://127.0.0.1:") for e in data["endpoints"])


def test_resolve_errors():
    out = stax("resolve", "--graph", GRAPH, "nope", "web", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["error"] == "unknown_env"
    out = stax("resolve", "--graph", GRAPH, "team-a", "billing", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["error"] == "no_provider"
    out = stax("resolve", "--graph", GRAPH, "team-a", "billing")
    assert out.returncode == 1 and "billing" in out.stderr
    assert stax("resolve", "team-a", "web").returncode == 2  # no graph source: usage
    for cmd in (("resolve", "--graph", GRAPH, "Team-A", "web", "--json"),
                ("config", "explain", "--graph", GRAPH, "Team-A", "--json")):
        out = stax(*cmd)  # what a request naming it is answered, not "unknown"
        assert out.returncode == 1 and json.loads(out.stdout)["error"] == "bad_context", out.stdout


def test_token_refuses_what_no_gateway_would_accept(tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 32)
    ok = stax("token", "--key", str(key), "--env", "team-a", "--ttl", "60")
    assert ok.returncode == 0 and ok.stdout.startswith("team-a.")
    for args, reason in ((("--env", "Team_A"), "invalid env name"), (("--env", "a", "--ttl", "0"), "--ttl"),
                         (("--env", "a", "--ttl", "-5"), "--ttl")):
        out = stax("token", "--key", str(key), *args)
        assert out.returncode == 2 and reason in out.stderr and not out.stdout, (args, out.stderr)
    out = stax("token", "--key", str(tmp_path / "missing"), "--env", "a")
    assert out.returncode == 2 and "cannot read" in out.stderr and "Errno" not in out.stderr


def test_resolve_explains_in_text():
    out = stax("resolve", "--graph", GRAPH, "feature-1", "orders")
    assert out.returncode == 0
    assert "ancestor (env team-a)" in out.stdout and "feature-1 has no overlay of orders" in out.stdout


def test_config_explain_names_sources():
    out = stax("config", "explain", "--graph", GRAPH, "feature-1", "--json")
    data = json.loads(out.stdout)
    assert data["config"]["orders.timeout_ms"] == {"value": 2000, "from": "team-a"}
    assert data["config"]["orders.retries"] == {"value": 1, "from": "baseline"}
    text = stax("config", "explain", "--graph", GRAPH, "feature-1").stdout
    assert "from team-a" in text


def test_check_config_dry_run():
    ok = stax("gateway", "--graph", GRAPH, "--listen", "127.0.0.1:0", "--check-config")
    assert ok.returncode == 0
    bad = stax("sidecar", "--graph", GRAPH, "--service", "web", "--app", "127.0.0.1:1", "--check-config")
    assert bad.returncode == 2 and "--env is required" in bad.stderr


def test_demo_runs_every_kind():
    out = stax("demo", timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("local", "ancestor", "baseline", "shared", "unknown_env", "no_provider",
                   "orders=ancestor:team-a@v1"):
        assert needle in out.stdout, needle


def test_graph_push_show_and_compare_and_set(redis_server, tmp_path):
    url = redis_server.url
    out = stax("graph", "push", GRAPH, "--redis", url)
    assert out.returncode == 0 and "graph version 1" in out.stdout
    out = stax("graph", "push", GRAPH, "--redis", url, "--expect-version", "1")
    assert out.returncode == 0 and "graph version 2" in out.stdout
    out = stax("graph", "push", GRAPH, "--redis", url, "--expect-version", "1")
    assert out.returncode == 3 and "expected 1, store has 2" in out.stderr
    shown = json.loads(stax("graph", "show", "--redis", url).stdout)
    assert shown["version"] == 2 and shown["baseline"] == "baseline" and "team-a" in shown["envs"]
    data = json.loads(stax("resolve", "--redis", url, "feature-1", "orders", "--json").stdout)
    assert (data["kind"], data["provider_env"], data["graph_version"]) == ("ancestor", "team-a", 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("baseline: b\nenvs: {b: {parent: x}}\n")
    out = stax("graph", "push", str(bad), "--redis", url)
    assert out.returncode == 1 and "store unchanged" in out.stderr
    assert json.loads(stax("graph", "show", "--redis", url).stdout)["version"] == 2
    # YAML values with no JSON form are refused by name, before anything is written
    nan = tmp_path / "nan.yaml"
    nan.write_text("baseline: b\nenvs: {b: {config: {feature.ratio: .nan, feature.tags: !!set {a}}}}\n")
    out = stax("graph", "push", str(nan), "--redis", url)
    assert out.returncode == 1 and "store unchanged" in out.stderr and "Traceback" not in out.stderr
    assert "config feature.ratio must be JSON data: nan is not a finite number" in out.stderr
    assert "config feature.tags must be JSON data" in out.stderr
    assert json.loads(stax("graph", "show", "--redis", url).stdout)["version"] == 2


def test_store_unreachable_is_a_clear_error():
    out = stax("graph", "show", "--redis", "redis://127.0.0.1:1/0")
    assert out.returncode == 1 and "127.0.0.1:1" in out.stderr and "Traceback" not in out.stderr


def test_a_bad_redis_url_is_a_usage_error_everywhere():
    """Said before anything starts (exit 2, no traceback), with the password redacted."""
    listen = ["--listen", "127.0.0.1:0", "--check-config"]
    for args, why in [
        (("graph", "show", "--redis", "notaurl"), "unsupported Redis URL notaurl"),
        (("graph", "push", GRAPH, "--redis", "redis://:hunter2@h:notaport/0"),
         "bad Redis URL redis://:***@h:notaport/0"),
        (("resolve", "--redis", "notaurl", "team-a", "web"), "unsupported Redis URL"),
        (("config", "explain", "--redis", "notaurl", "team-a"), "unsupported Redis URL"),
        (("demo", "--redis", "notaurl"), "unsupported Redis URL"),
        (("gateway", "--redis", "redis://h:notaport/0", *listen), "bad Redis URL redis://h:notaport/0"),
        (("gateway", "--redis", "notaurl", "--listen", "127.0.0.1:0"), "unsupported Redis URL"),
        (("sidecar", "--redis", "redis+sentinel://h:1", "--env", "team-a", "--service", "web",
          "--app", "127.0.0.1:1", *listen), "want redis+sentinel://"),
    ]:
        out = stax(*args)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert "hunter2" not in out.stderr
    assert stax("gateway", "--redis", "redis://127.0.0.1:6379/0", *listen).returncode == 0
