"""resolver.sources.delta: apply_delta(old, diff_docs(old, new)) == new, at env granularity."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.sources.delta import apply_delta, diff_docs, diff_summary, summarize
from resolver.validate import load_document, parse_graph

GRAPH = "tests/data/graph.yaml"


def strict(doc: object) -> bytes:
    """Canonical JSON: equal only when the documents are equal as JSON (1 != 1.0 != true)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def base_doc() -> dict:
    with open(GRAPH, "rb") as f:
        return load_document(f.read())


# -- strategies --------------------------------------------------------------------------
names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,6}", fullmatch=True)
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2, allow_nan=False) \
    | st.text(max_size=4)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
endpoints = st.lists(st.builds("127.0.0.1:{}".format, st.integers(1, 65535)), min_size=1,
                     max_size=3)
overlays = st.builds(lambda eps: {"endpoints": eps}, endpoints)
envs = st.fixed_dictionaries(
    {"services": st.dictionaries(names, overlays, max_size=3)},
    optional={"parent": names, "config": st.dictionaries(st.text(max_size=5), json_values,
                                                         max_size=3),
              "private": st.booleans()},
)
graph_docs = st.fixed_dictionaries(
    {"baseline": names, "envs": st.dictionaries(names, envs, max_size=6)},
    optional={"version": st.integers(1, 10), "epoch": st.text(max_size=4),
              "shared": st.dictionaries(names, overlays, max_size=3) | st.none()},
)
any_docs = st.dictionaries(
    st.sampled_from(["baseline", "envs", "shared", "epoch", "version", "other"]), json_values,
    max_size=5,
)


def mutate(doc: dict, data: st.DataObject) -> dict:
    """A related document: a few envs/shared services changed, added or removed."""
    new = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(0, 4))):
        what = data.draw(st.sampled_from(["env", "drop-env", "shared", "baseline", "epoch"]))
        if what == "env":
            new.setdefault("envs", {})[data.draw(names)] = data.draw(envs)
        elif what == "drop-env" and new.get("envs"):
            new["envs"].pop(data.draw(st.sampled_from(sorted(new["envs"]))))
        elif what == "shared" and isinstance(new.get("shared"), dict):
            new["shared"][data.draw(names)] = data.draw(overlays)
        elif what == "baseline":
            new["baseline"] = data.draw(names)
        elif what == "epoch":
            if "epoch" in new and data.draw(st.booleans()):
                del new["epoch"]
            else:
                new["epoch"] = data.draw(st.text(max_size=4))
    return new


# -- properties ------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(graph_docs, graph_docs)
def test_roundtrip_unrelated_graphs(old, new):
    old_copy, new_copy = copy.deepcopy(old), copy.deepcopy(new)
    delta = diff_docs(old, new)
    assert strict(apply_delta(old, delta)) == strict(new)
    assert old == old_copy and new == new_copy  # neither input is modified


@settings(max_examples=120, deadline=None)
@given(graph_docs, st.data())
def test_roundtrip_related_graphs_through_json(old, data):
    new = mutate(old, data)
    delta = orjson.loads(orjson.dumps(diff_docs(old, new)))  # it travels as JSON
    assert strict(apply_delta(old, delta)) == strict(new)


@settings(max_examples=200, deadline=None)
@given(any_docs, any_docs)
def test_roundtrip_arbitrary_documents(old, new):
    assert strict(apply_delta(old, diff_docs(old, new))) == strict(new)


@settings(max_examples=50, deadline=None)
@given(graph_docs)
def test_no_change_is_empty_delta(doc):
    assert diff_docs(doc, copy.deepcopy(doc)) == {}
    assert strict(apply_delta(doc, {})) == strict(doc)


@settings(max_examples=120, deadline=None)
@given(graph_docs, st.data())
def test_a_chain_of_changes_diffed_against_summaries(old, data):
    """The file decoder helper keeps only a summary of the last document: diffing the next one
    against it gives the delta diff_docs gives, and the summary to diff the one after."""
    mid = mutate(old, data)
    new = mutate(mid, data)
    delta, summary = diff_summary(summarize(old), mid)
    assert summary == summarize(mid)
    assert strict(apply_delta(old, delta)) == strict(mid)
    delta, _ = diff_summary(summary, new)
    assert strict(apply_delta(mid, delta)) == strict(new)


def test_a_summary_holds_digests_not_the_document():
    doc = {"baseline": "b", "envs": {f"e{i}": {"parent": "b", "services": {"web": {
        "endpoints": [f"10.0.{i // 256}.{i % 256}:8080"] * 8}}} for i in range(50)}}
    doc["envs"]["b"] = {"services": {}}
    summary = summarize(doc)
    assert set(summary) == {"baseline", "envs"} and set(summary["envs"]) == set(doc["envs"])
    assert all(isinstance(d, bytes) and len(d) == 16 for d in summary["envs"].values())


# -- examples --------------------------------------------------------------------------
def test_delta_names_only_what_changed():
    old = base_doc()
    new = copy.deepcopy(old)
    new["envs"]["team-b"] = {"parent": "baseline", "services": {"web": ["127.0.0.1:7401"]}}
    new["envs"]["team-a"]["config"]["orders.timeout_ms"] = 2500
    del new["envs"]["feature-1"]
    new["shared"]["auth"] = {"endpoints": ["127.0.0.1:7002"]}
    delta = diff_docs(old, new)
    assert delta == {
        "envs": {"set": {"team-b": new["envs"]["team-b"], "team-a": new["envs"]["team-a"]},
                 "del": ["feature-1"]},
        "shared": {"set": {"auth": {"endpoints": ["127.0.0.1:7002"]}}},
    }
    assert parse_graph(apply_delta(old, delta)) == parse_graph(new)


def test_top_level_changes_go_whole():
    old = {"baseline": "a", "epoch": "e1", "envs": {"a": {}}}
    new = {"baseline": "b", "envs": {"a": {}, "b": {"parent": "a"}}, "shared": {}}
    delta = diff_docs(old, new)
    assert delta == {"envs": {"set": {"b": {"parent": "a"}}},
                     "set": {"baseline": "b", "shared": {}}, "del": ["epoch"]}
    assert apply_delta(old, delta) == new


def test_type_changes_are_changes():
    # Python says 1 == 1.0 == True; JSON (and the graph) does not.
    old = {"envs": {"a": {"config": {"k": 1}}}, "version": 1}
    for value in (True, 1.0):
        new = {"envs": {"a": {"config": {"k": value}}}, "version": value}
        assert strict(apply_delta(old, diff_docs(old, new))) == strict(new)


def test_mapping_replaced_by_non_mapping_goes_whole():
    old = {"envs": {"a": {}}, "shared": {"x": {}}}
    new = {"envs": [], "shared": None}
    assert apply_delta(old, diff_docs(old, new)) == new
    assert apply_delta(new, diff_docs(new, old)) == old


@pytest.mark.parametrize("delta", [
    [],
    {"bogus": 1},
    {"envs": {"set": []}},
    {"envs": {"del": "a"}},
    {"envs": {"replace": {}}},
    {"set": ["a"]},
    {"del": "baseline"},
])
def test_malformed_delta_raises_value_error(delta):
    with pytest.raises(ValueError):
        apply_delta({"envs": {"a": {}}}, delta)


def test_entry_delta_on_non_mapping_raises():
    with pytest.raises(ValueError, match="not a mapping"):
        apply_delta({"envs": None}, {"envs": {"set": {"a": {}}}})
