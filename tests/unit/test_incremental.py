"""Incremental validation after a delta gives exactly the graph a full parse gives."""

from __future__ import annotations

import asyncio
import copy
import gc
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.errors import GraphInvalid, StaxError
from resolver.snapshot import Route
from resolver.sources.delta import apply_delta, changed_envs, diff_docs
from resolver.sync import SnapshotCell, build_snapshot
from resolver.validate import parse_graph


def base_doc(n: int = 30) -> dict:
    envs = {"base": {"services": {f"s{i}": {"endpoints": [f"h{i}:80"]} for i in range(5)}}}
    for i in range(n):
        envs[f"e{i}"] = {"parent": "base" if i < 5 else f"e{i % 5}",
                         "services": {f"s{i % 5}": {"endpoints": [f"x{i}:81"]}}}
    return {"baseline": "base", "shared": {"auth": {"endpoints": ["a:1"]}}, "envs": envs}


def incremental(old_doc: dict, new_doc: dict):
    old = parse_graph(old_doc)
    delta = diff_docs(old_doc, new_doc)
    assert apply_delta(old_doc, delta) == new_doc
    return parse_graph(new_doc, reuse=old, changed=changed_envs([delta])), old


def outcome(fn):
    try:
        return fn()
    except GraphInvalid as exc:
        return sorted(exc.problems)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "add", "parent", "private", "drop", "bad"]),
                          st.integers(0, 29), st.integers(0, 29)), max_size=5))
def test_incremental_equals_full(ops):
    """Adds and deletes take the full path; same-names changes (overlays, parents that may
    form cycles, private flags, removed overlays, invalid values) take the O(changed) path."""
    old_doc = base_doc()
    new_doc = copy.deepcopy(old_doc)
    for op, i, j in ops:
        name, env = f"e{i}", new_doc["envs"].get(f"e{i}")
        if op == "set" and env is not None:
            env["services"] = {"s9": {"endpoints": [f"new{i}:1"]}}
        elif op == "del" and not any(e.get("parent") == name for e in new_doc["envs"].values()):
            new_doc["envs"].pop(name, None)
        elif op == "add":
            new_doc["envs"][f"n{i}"] = {"parent": name if name in new_doc["envs"] else "base"}
        elif op == "parent" and env is not None:
            env["parent"] = f"e{j}"  # may close a cycle or name a missing env
        elif op == "private" and env is not None:
            env["private"] = not env.get("private", False)
        elif op == "drop" and env is not None:
            env["services"] = {}
        elif op == "bad" and env is not None:
            env["services"] = {"s1": {"endpoints": ["not a host:port:x"]}}
    old = parse_graph(old_doc)
    delta = diff_docs(old_doc, new_doc)
    assert apply_delta(old_doc, delta) == new_doc
    got = outcome(lambda: parse_graph(new_doc, reuse=old, changed=changed_envs([delta])))
    assert got == outcome(lambda: parse_graph(new_doc))
    if not isinstance(got, list):
        assert list(got.envs) == list(new_doc["envs"])
        untouched = [n for n in old_doc["envs"]
                     if n in new_doc["envs"] and old_doc["envs"][n] == new_doc["envs"][n]]
        assert all(got.envs[n] is old.envs[n] for n in untouched)  # reused, not re-parsed


def answers(snap) -> dict:
    """Every (env, service) resolution of a snapshot, errors included."""
    out = {}
    for env in list(snap.graph.envs) + ["ghost"]:
        for svc in sorted(snap.graph.services) + ["s9", "nothing"]:
            try:
                out[env, svc] = snap.explain(env, svc)
            except StaxError as exc:
                out[env, svc] = (exc.code, exc.message)
    return out


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "parent", "drop", "del", "add"]),
                          st.integers(0, 29), st.integers(0, 29)), min_size=1, max_size=4))
def test_resolutions_carried_over_equal_fresh_ones(ops):
    """A snapshot built from the previous one carries over routes whose chain did not change;
    every answer (kind, provider, endpoints, chain, x-stax-route with the new version) is the
    one a fresh snapshot gives."""
    old_doc = base_doc()
    new_doc = copy.deepcopy(old_doc)
    for op, i, j in ops:
        env = new_doc["envs"].get(f"e{i}")
        if op == "set" and env is not None:
            env["services"] = {f"s{j % 5}": {"endpoints": [f"new{i}:1"]}}
        elif op == "parent" and env is not None and i != j and i >= 5:
            env["parent"] = f"e{j % 5}"  # another team env: never a cycle
        elif op == "drop" and env is not None:
            env["services"] = {}
        elif op == "del" and not any(e.get("parent") == f"e{i}" for e in new_doc["envs"].values()):
            new_doc["envs"].pop(f"e{i}", None)
        elif op == "add":
            new_doc["envs"][f"n{i}"] = {"parent": "base", "services": {"s1": {"endpoints": ["n:1"]}}}
    old = build_snapshot(old_doc, version=1, source="t")
    answers(old)  # every route memoized, as a serving proxy would have them
    delta = diff_docs(old_doc, new_doc)
    new = build_snapshot(new_doc, version=2, source="t", reuse=old, changed=changed_envs([delta]))
    for _ in new.carry_steps(step=7):
        pass
    assert answers(new) == answers(build_snapshot(new_doc, version=2, source="t"))
    # carried or fresh, an answer is this snapshot's one Route for it
    seen: dict = {}
    for env in new.graph.envs:
        for svc in new.graph.services:
            r = new.resolve(env, svc)
            assert r.version == 2 and seen.setdefault((svc, r.kind, r.provider_env, r.settings), r) is r


def test_deleting_a_parent_still_referenced_is_rejected():
    old_doc = base_doc()
    new_doc = copy.deepcopy(old_doc)
    del new_doc["envs"]["e1"]  # e6, e11, ... still name it as parent
    with pytest.raises(GraphInvalid, match="missing parent 'e1'"):
        incremental(old_doc, new_doc)


def test_shared_change_means_no_reuse():
    old_doc = base_doc()
    new_doc = copy.deepcopy(old_doc)
    new_doc["shared"]["s0"] = {"endpoints": ["shared:1"]}  # base overlays s0: now invalid
    assert changed_envs([diff_docs(old_doc, new_doc)]) is None
    with pytest.raises(GraphInvalid, match="shared and cannot be overlaid"):
        incremental(old_doc, new_doc)


def test_file_reload_reuses_unchanged_envs_and_matches_a_full_parse():
    from resolver.sources.delta import changed_env_names
    from resolver.sync import build_snapshot_from_bytes

    old_doc = base_doc()
    import orjson

    first, _ = build_snapshot_from_bytes(orjson.dumps(old_doc), version_if_unset=1, source="t")
    new_doc = copy.deepcopy(old_doc)
    new_doc["envs"]["e7"]["services"] = {"s3": {"endpoints": ["moved:9"]}}
    assert changed_env_names(old_doc, new_doc) == {"e7"}
    snap, doc = build_snapshot_from_bytes(orjson.dumps(new_doc), version_if_unset=2, source="t",
                                          previous=(old_doc, first))
    assert doc == new_doc and snap.graph == parse_graph(new_doc, version=2)
    assert snap.graph.envs["e8"] is first.graph.envs["e8"]
    new_doc["shared"] = {}
    assert changed_env_names(old_doc, new_doc) is None


def test_file_reload_tells_true_from_1():
    """`private: 1` after `private: true` is a change, and an invalid one: rejected, as a
    full parse would (== alone would call the env unchanged and keep the old one)."""
    import orjson

    from resolver.sources.delta import changed_env_names
    from resolver.sync import build_snapshot_from_bytes

    old_doc = base_doc()
    old_doc["envs"]["e4"]["private"] = True
    first, _ = build_snapshot_from_bytes(orjson.dumps(old_doc), version_if_unset=1, source="t")
    new_doc = copy.deepcopy(old_doc)
    new_doc["envs"]["e4"]["private"] = 1
    assert changed_env_names(old_doc, new_doc) == {"e4"}
    with pytest.raises(GraphInvalid, match="private must be true or false"):
        build_snapshot_from_bytes(orjson.dumps(new_doc), version_if_unset=2, source="t",
                                  previous=(old_doc, first))


def test_reloads_carry_every_answer_into_the_memo_before_any_request():
    """The answers of the envs a change did not touch are in the new snapshot's memo once its
    carry has run, so no request resolves them again after a reload; and they stay there over
    reloads that no request saw in between: with the new version, their round-robin turn and
    the proxy's cells where they were, and the previous Routes as they were (in flight)."""
    doc = base_doc()
    first = build_snapshot(doc, version=1, source="t")
    answers(first)
    served = {(env, svc): r for svc, envs in first.memo.items() for env, r in envs.items()}
    for i, route in enumerate(served.values()):  # as a proxy leaves them: picks made, cells cached
        route.rr, route.stats = i, ("cell", i)
    snap, changes = first, [{"e2"}, {"e3"}, {"e9"}]
    for version, changed in enumerate(changes, start=2):
        new_doc = copy.deepcopy(doc)
        for name in changed:
            new_doc["envs"][name]["services"] = {"s4": {"endpoints": [f"v{version}:1"]}}
        snap = build_snapshot(new_doc, version=version, source="t", reuse=snap,
                              changed=frozenset(changed))
        assert not snap.memo  # nothing carried yet
        steps = sum(1 for _ in snap.carry_steps(step=10))
        assert steps >= 10  # in slices: over 100 answers, one pause every 10
        doc = new_doc
    # e2, e3, e9 and the envs under e2 and e3 (e7 = parent e2, e8 = parent e3, ...)
    touched = {"e2", "e3", "e9", "e7", "e12", "e17", "e22", "e27", "e8", "e13", "e18", "e23", "e28"}
    carried = {(env, svc): r for svc, envs in snap.memo.items() for env, r in envs.items()}
    assert set(carried) == {(env, svc) for env, svc in served if env not in touched}
    for (env, svc), route in carried.items():  # this snapshot's Routes, the answers unchanged
        old = served[env, svc]
        assert route.version == 4 and route.line == b"x-stax-route: " + route.header + b"\r\n"
        assert route.header.endswith(b"@v4") and old.header.endswith(b"@v1")  # in flight: as served
        # the answer, its round-robin turn and the proxy's cells go on: every slot but the label
        assert all(getattr(route, name) is getattr(old, name) for name in Route.__slots__
                   if name not in ("version", "header", "line"))
    assert answers(snap) == answers(build_snapshot(doc, version=4, source="t"))


def test_the_serving_snapshot_may_memoize_while_the_next_one_carries():
    """The carry yields to the loop, which goes on serving (and memoizing) on the current
    snapshot: answers it adds meanwhile, to a service being carried or to one new to its
    memo, break nothing, and no answer under the changed env is carried."""
    doc = base_doc()
    current = build_snapshot(doc, version=1, source="t")
    for env in ("e5", "e6", "e10", "e11"):
        current.resolve(env, "s1")
        current.resolve(env, "s2")
    new_doc = copy.deepcopy(doc)
    new_doc["envs"]["e0"]["services"] = {"s2": {"endpoints": ["moved:1"]}}
    new = build_snapshot(new_doc, version=2, source="t", reuse=current, changed=frozenset({"e0"}))
    served = iter(current.graph.envs)
    steps = 0
    for _ in new.carry_steps(step=1):  # requests served on the current snapshot meanwhile
        steps += 1
        env = next(served, "e1")
        current.resolve(env, "s2")
        current.resolve(env, "s4" if steps % 2 else "s3")
    assert steps >= 8  # a pause after every answer looked at (4 envs x 2 services)
    assert set(new.memo["s1"]) == {"e6", "e11"}
    assert not {"e0", "e5", "e10"} & {env for envs in new.memo.values() for env in envs}
    assert answers(new) == answers(build_snapshot(new_doc, version=2, source="t"))


def published_and_reloaded():
    """A cell serving a snapshot with every answer memoized, and the next snapshot built from
    it after e0 changed (not yet published): (cell, first, second, the second's document)."""
    cell = SnapshotCell()
    doc = base_doc()
    first = build_snapshot(doc, version=1, source="t")
    cell.publish(first)
    answers(first)
    new_doc = copy.deepcopy(doc)
    new_doc["envs"]["e0"]["services"] = {"s2": {"endpoints": ["moved:1"]}}
    second = build_snapshot(new_doc, version=2, source="t", reuse=first, changed=frozenset({"e0"}))
    return cell, first, second, new_doc


def test_a_snapshot_published_without_install_carries_whole_and_lets_the_previous_go():
    """publish() (no slices) still carries the answers over, and no snapshot keeps the one
    before it alive: a chain of reloads never becomes a chain of graphs in memory."""
    cell, first, second, _ = published_and_reloaded()
    cell.publish(second)
    assert second.memo["s1"]["e6"].version == 2 and "e5" not in second.memo["s1"]
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None


async def test_install_serves_the_new_snapshot_at_once_and_carries_behind_it():
    """install() publishes first: a new graph is not held back by the carry (seconds with a
    big memo on a saturated loop). A request for a pair the carry has not reached is carried
    on the spot, not resolved again; when the carry is done the previous snapshot is let go."""
    cell, first, second, new_doc = published_and_reloaded()
    installing = asyncio.ensure_future(cell.install(second))
    await asyncio.sleep(0)
    assert cell.current is second and not installing.done()
    last_env = list(first.graph.envs)[-1]  # e29: the carry reaches it last
    assert last_env not in second.memo.get("s4", {})
    second.chain = lambda env: pytest.fail(f"{env} resolved again")  # type: ignore[method-assign]
    route = second.resolve(last_env, "s4")  # carried: its chain is not walked
    assert route.version == 2 and (route.kind, route.provider_env) == ("local", last_env)
    del second.chain
    await installing
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
    assert answers(second) == answers(build_snapshot(new_doc, version=2, source="t"))
