"""Context parsing: baggage, traceparent, path normalization (pure logic)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stages.context import Parsed, context_lines, cookie_value, parse_baggage
from proxy.stages.path import needs_normalizing, normalize_path
from proxy.tracing import parse_traceparent
from resolver.errors import BadContext, BadRequest, HeadersTooLarge, StaxError


def bag(*values):
    return parse_baggage(list(values), max_bytes=8192, max_members=64)


def test_baggage_member_found_and_others_kept():
    env, others = bag(b"a=1, stax.env=team-a;p=x", b"b=2")
    assert env == b"team-a" and others == b"a=1,b=2"


def test_baggage_percent_decoded_and_conflicts():
    assert bag(b"stax.env=team%2Da")[0] == b"team-a"
    with pytest.raises(BadContext):
        bag(b"stax.env=a", b"stax.env=b")


def test_baggage_limits():
    with pytest.raises(HeadersTooLarge):
        bag(b",".join(b"k%d=v" % i for i in range(65)))
    with pytest.raises(HeadersTooLarge):
        bag(b"k=" + b"v" * 9000)


def test_traceparent():
    good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(good) == (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", b"01")
    for bad in (b"", b"00-xyz", good.replace(b"4bf9", b"0000").replace(b"2f3577b34da6a3ce929d0e0e4736", b"0" * 28),
                b"ff" + good[2:], good + b"-extra"):
        assert parse_traceparent(bad) is None


def test_cookie():
    assert cookie_value(b"a=b; stax-env=team-a; c=d", b"stax-env") == b"team-a"
    assert cookie_value(b"a=b", b"stax-env") is None


@pytest.mark.parametrize("raw,want", [
    (b"/a/b?x=1", b"/a/b?x=1"), (b"/a/./b", b"/a/b"), (b"/a/../../b", b"/b"),
    (b"//a///b", b"/a/b"), (b"/%2e%2E/x", b"/x"), (b"/a/b/..", b"/a/"),
])
def test_normalize_path(raw, want):
    assert normalize_path(raw) == want


@pytest.mark.parametrize("raw", [b"/a%2fb", b"/a%5Cb", b"/%2F"])
def test_encoded_separators_refused(raw):
    with pytest.raises(BadRequest):
        normalize_path(raw)


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e"]), max_size=8))
def test_normalized_paths_have_no_dot_segments(parts):
    out = normalize_path(("/" + "/".join(parts)).encode())
    segs = out.split(b"/")
    assert out.startswith(b"/") and b"//" not in out
    assert b"." not in segs and b".." not in segs
    assert normalize_path(out) == out  # idempotent


_GOOD_TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@settings(max_examples=400, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 54), st.sampled_from(b"0af-AF x")), max_size=3),
       st.sampled_from([b"", b" ", b"-00"]))
def test_traceparent_fast_path_agrees_with_the_regex(edits, suffix):
    from proxy.tracing import _parse_slow

    value = bytearray(_GOOD_TP)
    for pos, byte in edits:
        value[pos] = byte
    value = bytes(value) + suffix
    assert parse_traceparent(value) == _parse_slow(value)


def test_context_lines_carry_the_env_after_the_other_members():
    assert context_lines("team-a", b"userId=1,k=v") == (
        b"x-stax-env: team-a\r\nbaggage: userId=1,k=v,stax.env=team-a\r\ntraceparent: 00-")
    assert context_lines("team-a", b"") == (
        b"x-stax-env: team-a\r\nbaggage: stax.env=team-a\r\ntraceparent: 00-")


def _members(value: bytes) -> list[bytes]:
    return sorted(m.strip() for m in value.split(b",") if m.strip())


def test_a_value_goes_upstream_as_received_when_its_stax_env_member_is_plain():
    def span(raw):
        p = Parsed(*bag(raw), raw)
        return raw[p.at:p.end] if p.at >= 0 else None

    assert span(b"stax.env=team-a") == b"team-a"
    assert span(b"userId=1, stax.env=team-a ,k=v") == b"team-a"
    # rewritten: a property, percent-encoding, spaces around "=", two members, "stax.env" elsewhere
    for raw in (b"stax.env=team-a;p=1", b"stax.env=team-a ;p=1", b"stax.env=team%2Da",
                b"stax.env = team-a", b"stax.env=team-a,stax.env=team-a", b"k=stax.env,stax.env=team-a",
                b"xstax.env=team-a,stax.env=team-a"):
        assert span(raw) is None, raw
    two = Parsed(*bag(b"stax.env=team-a", b"k=v"))  # two header values: always rewritten
    assert two.at == -1 and two.lines is not None


_PIECES = [b"stax.env=team-a", b"stax.env=team%2Da", b"stax.env=team-a;p=1", b" stax.env=team-a ",
           b"stax.env = team-a", b"stax.env=team-a ;p", b"xstax.env=team-a", b"userId=1", b"k=stax.env",
           b"a=b;c", b"", b" ", b"\t"]


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.sampled_from(_PIECES), max_size=5).map(b",".join))
def test_a_value_sent_as_received_has_the_members_the_rewrite_would_send(raw):
    try:
        env, others = bag(raw)
    except StaxError:
        return
    p = Parsed(env, others, raw)
    if p.at < 0:
        return
    assert p.name is not None and raw[p.at:p.end] == p.name.encode()
    assert p.lines == context_lines(p.name, others)  # what a rewrite sends, for the other paths
    assert _members(raw) == _members(others + b",stax.env=" + p.name.encode())


def test_new_ids_are_lowercase_hex_nonzero_and_do_not_repeat():
    from proxy.tracing import new_span_id, new_trace_id

    spans = [new_span_id() for _ in range(3000)]  # across several refills of the buffer
    traces = [new_trace_id() for _ in range(1000)]
    for ids, digits in ((spans, 16), (traces, 32)):
        assert len(set(ids)) == len(ids)
        for i in ids:
            assert len(i) == digits and not i.translate(None, b"0123456789abcdef")
            assert i != b"0" * digits


def test_a_forked_child_does_not_repeat_its_parent_s_ids():
    import os

    from proxy.tracing import new_span_id

    new_span_id()  # the buffer holds ids the child must not hand out
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, b"".join(new_span_id() for _ in range(8)))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 4096)
    parent = b"".join(new_span_id() for _ in range(8))
    assert len(child) == 128 and child != parent


@settings(max_examples=400, derandomize=True)
@given(st.lists(st.sampled_from([b"/", b".", b"%", b"?", b"a", b"2e", b"//"]), max_size=10))
def test_needs_normalizing_is_the_scan_it_replaced(parts):
    """A byte loop stands in for a regex search of the path before any "?"."""
    target = b"".join(parts)
    path = target.partition(b"?")[0]
    assert needs_normalizing(target) == (re.search(rb"/\.|//|%", path) is not None)


# -- the route a parsed baggage value remembers is the snapshot's answer ------------------
_ENVS = {"e0": None, "e1": "e0", "e2": "e1", "e3": "e0"}  # name -> parent


@st.composite
def _graph_docs(draw):
    """A graph over _ENVS: e0 provides every service, the others overlay some; a version that
    another draw may repeat (a republished or rolled-back store)."""
    envs = {}
    for name, parent in _ENVS.items():
        own = ["s0", "s1", "s2"] if parent is None else draw(st.lists(st.sampled_from(["s0", "s1", "s2"]), unique=True))
        envs[name] = {"services": {s: {"endpoints": [f"{name}-{s}:80"]} for s in own}}
        if parent is not None:
            envs[name]["parent"] = parent
    return {"version": draw(st.integers(1, 2)), "baseline": "e0", "envs": envs}


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(_graph_docs(), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 3), st.sampled_from(sorted(_ENVS)), st.sampled_from(["s0", "s1", "s2"]),
                          st.booleans()),
                min_size=1, max_size=30))
def test_the_route_remembered_per_baggage_value_is_the_serving_snapshot_s(docs, steps):
    """Requests repeat baggage values across snapshot swaps (some with the same version),
    services and envs named by x-stax-env: each gets the route the serving snapshot resolves,
    never one remembered from another snapshot, service or env."""
    from proxy.request import Request
    from proxy.stages.context import make_context
    from proxy.stages.route import make_egress_route
    from resolver.snapshot import Snapshot
    from resolver.sync import SnapshotCell
    from resolver.validate import parse_graph

    cell = SnapshotCell()
    context = make_context(max_hops=10, max_baggage_bytes=8192, max_baggage_members=64,
                           default_env=lambda req: "e0")
    route = make_egress_route(cell)
    serving = None
    for i, env, service, via_header in steps:
        if i < len(docs) and serving is not docs[i]:
            serving = docs[i]
            cell.current = Snapshot(parse_graph(serving))
        elif cell.current is None:
            serving = docs[0]
            cell.current = Snapshot(parse_graph(serving))
        req = Request(b"GET", b"/", "1.1", [], True, "127.0.0.1", b"http", 0.0)
        if via_header:  # one baggage value for every env: the env is x-stax-env's
            req.h_baggage, req.h_env = [b"k=v"], env.encode()
        else:
            req.h_baggage = [f"stax.env={env},k=v".encode()]
        req.host = service.encode()
        context(req)
        route(req)
        node = env  # the nearest env in the chain overlaying the service
        while service not in serving["envs"][node]["services"]:
            node = _ENVS[node]
        assert (req.route.service, req.route.provider_env) == (service, node)
        assert req.route is cell.current.resolve(env, service)
