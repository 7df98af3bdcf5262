"""Resolution and validation as pure logic (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.errors import GraphInvalid, NoProvider, UnknownEnv
from resolver.snapshot import Snapshot
from resolver.validate import load_document, parse_graph

with open("tests/data/graph.yaml", "rb") as _f:
    DOC = load_document(_f.read())


def snap(doc=DOC) -> Snapshot:
    return Snapshot(parse_graph(doc))


@pytest.mark.parametrize("env,service,kind,provider", [
    ("feature-1", "web", "local", "feature-1"),
    ("feature-1", "orders", "ancestor", "team-a"),
    ("team-a", "orders", "local", "team-a"),
    ("team-a", "web", "baseline", "baseline"),
    ("baseline", "web", "local", "baseline"),
    ("feature-1", "auth", "shared", None),
    ("baseline", "auth", "shared", None),
])
def test_kinds(env, service, kind, provider):
    r = snap().resolve(env, service)
    assert (r.kind, r.provider_env) == (kind, provider)
    assert r.header == (f"{service}=shared@v1" if kind == "shared" else f"{service}={kind}:{provider}@v1").encode()


def test_route_settings_come_from_request_env_chain():
    s = snap()
    assert s.resolve("feature-1", "orders").timeout_s == 2.0  # team-a sets it
    assert s.resolve("baseline", "orders").timeout_s == 5.0
    assert s.resolve("feature-1", "web").timeout_s == 15.0  # default
    assert s.resolve("feature-1", "orders").retries == 1


def test_unknown_env_is_an_error_never_baseline():
    with pytest.raises(UnknownEnv, match="nope"):
        snap().resolve("nope", "web")


def test_unprovided_service_names_the_chain():
    doc = {"baseline": "b", "envs": {"b": {"services": {"x": {"endpoints": ["h:1"]}}},
                                     "c": {"parent": "b", "services": {"y": {"endpoints": ["h:2"]}}}}}
    with pytest.raises(NoProvider, match="searched b"):
        snap(doc).resolve("b", "y")
    with pytest.raises(NoProvider, match="not a service"):
        snap(doc).resolve("c", "zzz")


def test_deep_chain_and_memo():
    envs = {"e0": {"services": {"s": {"endpoints": ["h:1"]}}}}
    for i in range(1, 200):
        envs[f"e{i}"] = {"parent": f"e{i - 1}"}
    envs["e150"]["services"] = {"s": {"endpoints": ["h:150"]}}
    s = snap({"baseline": "e0", "envs": envs})
    r = s.resolve("e199", "s")
    assert (r.kind, r.provider_env, len(s.explain("e199", "s")["chain"])) == ("ancestor", "e150", 50)
    assert s.resolve("e199", "s") is r  # memoized: the steady state is a dict look-up
    assert s.resolve("e100", "s").kind == "baseline"
    assert s.resolve("e160", "s") is r  # the same answer: the same Route


def test_envs_that_resolve_alike_share_one_route():
    """One Route per distinct answer (kind, provider, settings), whatever the number of envs
    asking: memory grows with the overlays, not with the (env, service) pairs requested."""
    envs = {"base": {"services": {"web": {"endpoints": ["h:1"]}}}}
    for t in range(10):
        envs[f"team-{t}"] = {"parent": "base"}
        if t % 2:
            envs[f"team-{t}"]["services"] = {"web": {"endpoints": [f"t{t}:1"]}}
        for f in range(100):
            envs[f"feat-{t}-{f}"] = {"parent": f"team-{t}"}
    envs["feat-3-7"]["config"] = {"web.timeout_ms": 1234}  # own settings: its own Route
    s = snap({"baseline": "base", "envs": envs})
    routes = {e: s.resolve(e, "web") for e in envs}
    # base + (5 teams inheriting: baseline) + 5 local + 5 ancestor + one with its own timeout
    assert len({id(r) for r in routes.values()}) == 13
    assert routes["feat-0-1"] is routes["feat-2-99"] is routes["team-0"]  # baseline:base
    assert routes["feat-1-0"] is routes["feat-1-99"] is not routes["team-1"]  # ancestor vs local
    assert (routes["feat-1-0"].kind, routes["team-1"].kind) == ("ancestor", "local")
    assert routes["feat-3-7"].timeout_s == 1.234 and routes["feat-3-6"].timeout_s == 15.0
    assert s.explain("feat-1-5", "web")["chain"][-1] == {
        "env": "team-1", "provides": True, "why": "team-1 overlays web"}


def test_explain_shape():
    info = snap().explain("feature-1", "orders")
    assert info["chain"] == [
        {"env": "feature-1", "provides": False, "why": "feature-1 has no overlay of orders; look in its parent"},
        {"env": "team-a", "provides": True, "why": "team-a overlays orders"},
    ]
    assert info["endpoints"] == ["http://127.0.0.1:7202"]


@pytest.mark.parametrize("doc,reason", [
    ({"envs": {"b": {}}}, "missing baseline"),
    ({"baseline": "b", "envs": {"c": {}}}, "missing baseline"),
    ({"baseline": "b", "envs": {"b": {}, "c": {"parent": "x"}}}, "missing parent 'x'"),
    ({"baseline": "b", "envs": {"b": {}, "c": {"parent": "d"}, "d": {"parent": "c"}}}, "cycle"),
    ({"baseline": "b", "envs": {"b": {}, "c": {}}}, "missing parent (only the baseline"),
    ({"baseline": "b", "envs": {"b": {}, "Bad": {"parent": "b"}}}, "bad env name"),
    ({"baseline": "b", "shared": {"a": {"endpoints": ["h:1"]}},
      "envs": {"b": {"services": {"a": {"endpoints": ["h:1"]}}}}}, "shared and cannot be overlaid"),
    ({"baseline": "b", "envs": {"b": {"services": {"s": {"endpoints": []}}}}}, "empty"),
    ({"baseline": "b", "envs": {"b": {"services": {"s": {"endpoints": ["ftp://h:1"]}}}}}, "malformed endpoint"),
    ({"baseline": "b", "envs": {"b": {"services": {"s": {"endpoints": ["h:99999"]}}}}}, "port out of range"),
    ({"baseline": "b", "envs": {"b": {"services": {"S_1": {"endpoints": ["h:1"]}}}}}, "bad service name"),
    ({"baseline": "b", "envs": {"b": {"config": {"s.timeout_ms": "fast"}}}}, "integer"),
    ({"baseline": "b", "envs": {"b": {"parnet": "x"}}}, "unknown field"),
])
def test_each_rejection_reason(doc, reason):
    with pytest.raises(GraphInvalid) as exc:
        parse_graph(doc)
    assert any(reason in p for p in exc.value.problems), exc.value.problems


def test_every_problem_is_reported_at_once():
    doc = {"baseline": "b", "envs": {"b": {"services": {"s": {"endpoints": []}}},
                                     "x": {"parent": "nope"}, "Y": {"parent": "b"}}}
    with pytest.raises(GraphInvalid) as exc:
        parse_graph(doc)
    assert len(exc.value.problems) == 3


def test_endpoint_forms_and_round_trip():
    doc = {"baseline": "b", "envs": {"b": {"services": {"s": {"endpoints": [
        "10.0.0.1:80", "http://svc.ns:8080", "https://api.example.com:443/",
        {"address": "[::1]:9000", "weight": 3, "region": "eu-west-1"}]}}}}}
    g = parse_graph(doc)
    eps = g.envs["b"].services["s"].endpoints
    assert [str(e) for e in eps] == ["http://10.0.0.1:80", "http://svc.ns:8080",
                                     "https://api.example.com:443", "http://[::1]:9000"]
    assert eps[3].weight == 3 and eps[3].attrs["region"] == "eu-west-1"
    assert parse_graph(g.to_doc()) == g


def test_unknown_config_keys_are_kept_and_explained():
    doc = {"baseline": "b", "envs": {"b": {"config": {"feature.flag": True}},
                                     "c": {"parent": "b"}}}
    s = snap(doc)
    assert s.config("c")["feature.flag"] == (True, "b")



def test_config_values_must_have_a_json_form():
    """YAML can write NaN, dates, sets and huge integers; JSON (Redis, --json) cannot, so a
    graph holding them would mean one thing from a file and another from Redis."""
    yaml_doc = load_document(b"""baseline: b
envs:
  b:
    config:
      feature.ratio: .nan
      feature.since: 2026-01-01
      feature.tags: !!set {a, b}
      feature.big: 123456789012345678901234567890
      feature.nested: {limits: [1, 2.5, .inf]}
      feature.keys: {1: one}
      feature.nokey: {~: one}
      feature.ok: {a: [1, 2.5, null, true, "x"]}
""")
    with pytest.raises(GraphInvalid) as exc:
        parse_graph(yaml_doc)
    problems = exc.value.problems
    assert len(problems) == 7, problems
    expect = {"feature.ratio": "nan is not a finite number", "feature.since": "(date) has no JSON form",
              "feature.tags": "(set) has no JSON form", "feature.big": "out of 64-bit range",
              "feature.nested": "inf is not a finite number", "feature.keys": "mapping key 1 is not a string",
              "feature.nokey": "mapping key None is not a string"}
    for key, why in expect.items():
        assert any(f"config {key} must be JSON data" in p and why in p for p in problems), (key, problems)
    assert not any("feature.ok" in p for p in problems)
    # nesting is bounded (printing or explaining a deeper value would overflow the stack)
    def nested(depth):
        value: list | int = 1
        for _ in range(depth):
            value = [value]
        return {"baseline": "b", "envs": {"b": {"config": {"k": value}}}}
    assert parse_graph(nested(32)).envs["b"].config["k"]
    with pytest.raises(GraphInvalid, match="nest more than 32 deep"):
        parse_graph(nested(33))
    with pytest.raises(GraphInvalid, match="nest more than 32 deep"):
        parse_graph(nested(5000))  # deeper than Python's recursion limit: still a clear answer

# -- property: resolution equals a naive walk on random graphs ---------------------------
@st.composite
def graphs(draw):
    n = draw(st.integers(1, 12))
    names = [f"e{i}" for i in range(n)]
    services = ["s0", "s1", "s2", "s3"]
    shared = draw(st.sets(st.sampled_from(services), max_size=1))
    envs = {}
    for i, name in enumerate(names):
        env = {}
        if i:
            env["parent"] = names[draw(st.integers(0, i - 1))]
        own = draw(st.sets(st.sampled_from([s for s in services if s not in shared])))
        env["services"] = {s: {"endpoints": [f"h{i}:{1000 + i}"]} for s in sorted(own)}
        envs[name] = env
    doc = {"baseline": "e0", "envs": envs,
           "shared": {s: {"endpoints": ["shared:1"]} for s in shared}}
    return doc


def naive(doc, env, service):
    if service in doc["shared"]:
        return ("shared", None)
    node = env
    while node is not None:
        if service in doc["envs"][node].get("services", {}):
            kind = "local" if node == env else ("baseline" if node == doc["baseline"] else "ancestor")
            return (kind, node)
        node = doc["envs"][node].get("parent")
    return None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(graphs(), st.data())
def test_resolution_equals_naive_walk(doc, data):
    s = snap(doc)
    env = data.draw(st.sampled_from(sorted(doc["envs"])))
    for service in ("s0", "s1", "s2", "s3"):
        expected = naive(doc, env, service)
        if expected is None:
            with pytest.raises(NoProvider):
                s.resolve(env, service)
        else:
            r = s.resolve(env, service)
            assert (r.kind, r.provider_env) == expected


def test_weighted_round_robin_spreads_each_turn():
    """Each endpoint gets `weight` picks a turn, spread out: a few requests from wherever the
    cursor stands get near their shares, and weight 0 gets none, however big the weights."""
    def endpoints(*weights):
        return {"endpoints": [{"address": f"{h}:1", "weight": w} for h, w in zip("acz"[:len(weights)], weights, strict=True)]}

    doc = {"baseline": "b", "envs": {"b": {"services": {
        "s": endpoints(3, 1), "t": endpoints(9, 1, 0), "big": endpoints(30000, 10000, 0)}}}}
    snap = Snapshot(parse_graph(doc))

    def turn(service: str) -> str:
        return "".join(e.host for e in snap.resolve("b", service).picks)

    assert turn("s") == "aaca"
    assert turn("t") == "aaaaacaaaa"  # c halfway through, not after nine a's
    big = turn("big")  # scaled down to 10,000 picks
    assert len(big) == 10000 and big.count("c") == 2500 and "z" not in big


def test_a_fresh_answer_starts_its_turn_at_a_random_pick():
    """Every proxy meets a graph change with the same fresh answers. Started at the first pick,
    all of them would send their next requests to the same endpoint (grpc-java #4462 measured
    3-4x the load on some nodes during deployments); each starts anywhere in its turn."""
    graph = parse_graph({"baseline": "b", "envs": {"b": {"services": {
        "s": {"endpoints": ["a:1", "c:1", "d:1", "e:1"]},
        "w": {"endpoints": [{"address": "a:1", "weight": 3}, {"address": "c:1", "weight": 1}]},
        "one": {"endpoints": ["a:1"]}}}}})
    fresh = [Snapshot(graph) for _ in range(200)]  # as many proxies, or reloads that change s
    assert {snap.resolve("b", "s").rr for snap in fresh} == {0, 1, 2, 3}  # missing one: p < 1e-24
    assert {snap.resolve("b", "w").rr for snap in fresh} == {0, 1, 2, 3}  # anywhere in a a c a
    assert {snap.resolve("b", "one").rr for snap in fresh} == {0}
