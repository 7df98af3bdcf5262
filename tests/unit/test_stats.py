"""proxy.stats: the request path's counter cells, compiled with it."""

from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stats import _CLASS_OF, BUCKETS, Stats
from resolver.sources.file import load_file

ROUTE = load_file("tests/data/graph.yaml").resolve("baseline", "web")


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.floats(0, 30, allow_nan=False) | st.sampled_from(BUCKETS), max_size=20),
       st.sampled_from([200, 204, 302, 404, 503, 99, 600]))
def test_observe_counts_like_bisect_and_the_status_class(durations, status):
    stats = Stats("gateway")
    ROUTE.stats = None  # a fresh cell for this example
    expected = [0] * (len(BUCKETS) + 1)
    for d in durations:
        stats.observe(ROUTE, status, d)
        expected[bisect.bisect_left(BUCKETS, d)] += 1
    if durations:
        cell = ROUTE.stats
        assert cell.buckets == expected
        assert cell.total_s == sum(durations)
        assert cell.codes[_CLASS_OF[status]] == len(durations) == sum(cell.codes)
