"""resolver.sources.json_splice: a changed JSON graph file diffed from its bytes gives the delta
a full decode gives, or None; never a wrong one, whatever the edit."""

from __future__ import annotations

import copy
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.sources.delta import advance_summary, apply_delta, diff_docs, summarize
from resolver.sources.json_splice import changed_range, layout, splice
from tests.unit.test_delta import envs, graph_docs, mutate, strict

FORMATS = {
    "orjson": orjson.dumps,
    "indented": lambda doc: json.dumps(doc, indent=2).encode(),
    "spaced": lambda doc: json.dumps(doc).encode(),
}
formats = st.sampled_from(sorted(FORMATS))


def check(old_doc: dict, old: bytes, new: bytes):
    """splice's answer for old -> new, checked against decoding new whole."""
    old_layout = layout(old)
    if old_layout is None:
        assert not old.isascii()  # the one kind of valid graph file it cannot place
        return None
    found = splice(old, old_layout, new)
    if found is None:
        return None
    delta, new_layout = found
    new_doc = orjson.loads(new)  # a spliced file always decodes
    assert strict(apply_delta(old_doc, delta)) == strict(new_doc)
    assert delta == diff_docs(old_doc, new_doc)  # the very delta the fingerprints give
    assert new_layout == layout(new)  # kept up to date: the next splice starts from truth
    assert advance_summary(summarize(old_doc), delta) == summarize(new_doc)
    return delta


# -- properties ------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(graph_docs, st.data(), formats)
def test_related_documents_splice_to_the_full_decode_s_delta(old_doc, data, fmt):
    old_doc = orjson.loads(orjson.dumps(old_doc))  # as a file holds it
    new_doc = mutate(old_doc, data)
    dump = FORMATS[fmt]
    check(old_doc, dump(old_doc), dump(new_doc))


@settings(max_examples=200, deadline=None)
@given(graph_docs, st.data(), formats)
def test_one_env_changed_always_splices(old_doc, data, fmt):
    old_doc = orjson.loads(orjson.dumps(old_doc))
    if not old_doc["envs"]:
        old_doc["envs"]["only"] = {"services": {}}
    name = data.draw(st.sampled_from(sorted(old_doc["envs"])))
    new_doc = copy.deepcopy(old_doc)
    new_doc["envs"][name] = data.draw(envs)
    dump = FORMATS[fmt]
    old, new = dump(old_doc), dump(new_doc)
    delta = check(old_doc, old, new)
    if delta is None:
        assert not (old + new).isascii()
    else:
        assert set(delta.get("envs", {}).get("set", {})) <= {name}


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3),
                           st.text(alphabet='{}[],:" \n0a-\\e1', max_size=3)),
                 min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(graph_docs, edits, formats)
def test_random_byte_edits_splice_right_or_not_at_all(old_doc, edit_list, fmt):
    """Bytes cut and inserted anywhere: whatever splice accepts decodes, to what it says."""
    old_doc = orjson.loads(orjson.dumps(old_doc))
    old = FORMATS[fmt](old_doc)
    new = old
    for at, cut, text in edit_list:
        at %= len(new) + 1
        new = new[:at] + text.encode() + new[at + cut:]
    try:
        orjson.loads(new)
        valid = True
    except orjson.JSONDecodeError:
        valid = False
    old_layout = layout(old)
    found = splice(old, old_layout, new) if old_layout is not None else None
    if found is not None:
        assert valid, f"spliced a file that does not decode: {new[:200]!r}"
        check(old_doc, old, new)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=9000), st.binary(max_size=40), st.binary(max_size=40),
       st.binary(max_size=9000))
def test_changed_range_is_the_shortest_differing_stretch(prefix, a, b, suffix):
    """Across the 4 KiB chunks it compares first, too."""
    old, new = prefix + a + suffix, prefix + b + suffix
    p, q = changed_range(old, new)
    by = len(new) - len(old)
    assert old[:p] == new[:p] and old[q:] == new[q + by:]
    assert p <= q and p <= q + by
    assert p == min(len(old), len(new)) or old[p] != new[p]  # no longer prefix
    assert q == p or q + by == p or old[q - 1] != new[q + by - 1]  # no longer suffix


# -- cases -----------------------------------------------------------------------------
def big(n: int = 3000) -> dict:
    return {"baseline": "b", "shared": {"auth": {"endpoints": ["a:1"]}},
            "envs": {"b": {"services": {"web": {"endpoints": ["w:1"]}}},
                     **{f"e{i:04d}": {"parent": "b", "services": {}} for i in range(n)}}}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_env_in_thousands(fmt):
    doc = big()
    new_doc = copy.deepcopy(doc)
    new_doc["envs"]["e1500"]["services"] = {"web": {"endpoints": ["moved:2"]}}
    delta = check(doc, FORMATS[fmt](doc), FORMATS[fmt](new_doc))
    assert delta == {"envs": {"set": {"e1500": new_doc["envs"]["e1500"]}}}


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["envs"].pop("e0007"), {"envs": {"del": ["e0007"]}}),
    (lambda d: d["envs"].pop("e2999"), {"envs": {"del": ["e2999"]}}),
    (lambda d: d["envs"].update({"new": {"parent": "b", "services": {}}}),
     {"envs": {"set": {"new": {"parent": "b", "services": {}}}}}),
    (lambda d: d.update({"baseline": "b2"}), {"set": {"baseline": "b2"}}),
    (lambda d: d["shared"]["auth"].update({"endpoints": ["a:2"]}),
     {"shared": {"set": {"auth": {"endpoints": ["a:2"]}}}}),
])
def test_entries_added_removed_and_top_level_values(change, expected):
    doc = big()
    new_doc = copy.deepcopy(doc)
    change(new_doc)
    assert check(doc, orjson.dumps(doc), orjson.dumps(new_doc)) == expected


def test_spacing_only_is_no_change():
    doc = big(10)
    assert check(doc, json.dumps(doc).encode(), json.dumps(doc, indent=1).encode()) in (None, {})
    old = json.dumps(doc).encode()
    assert check(doc, old, old.replace(b'"parent": "b"', b'"parent":"b"', 1)) == {}


@pytest.mark.parametrize("new", [
    b'{"baseline": "b", "envs": {"b": {}, "e": {}, }}',  # trailing comma
    b'{"baseline": "b", "envs": {"b": {}, , "e": {}}}',  # an entry cut, its comma left
    b'{"baseline": "b", "envs": {"b": {}, "e": {}, "b": {"x": 1}}}',  # a name given twice
    b'{"baseline": "b", "envs": {"b": {}, "e": {}}, "baseline": "c"}',
    b'{"baseline": "b", "envs": {"b": {}, "e": {"x": NaN}}}',
    b'{"baseline": "b", "envs": {"b": {}, "e": {"x": "\xc3\xa9"}}}',  # not ASCII
    b'{"baseline": "b", "envs": []}',  # the mapping replaced
    b'{"baseline": "b", "envs": {"b": {}, "e": {}}} x',
])
def test_what_it_cannot_prove_is_left_to_the_full_decode(new):
    old = b'{"baseline": "b", "envs": {"b": {}, "e": {}}}'
    assert splice(old, layout(old), new) is None


def test_layout_refuses_what_it_cannot_place():
    assert layout(b"baseline: b\nenvs: {}\n") is None  # YAML
    assert layout('{"baseline": "\u00e9"}'.encode()) is None  # offsets would not be bytes
    assert layout(b'{"a": 1, "a": 2}') is None
    assert layout(b'{"a": 1') is None
    assert layout(b'{"a": 1} {}') is None
    assert layout(b" {} ") == ()
