"""Smoke of the load-test harnesses: one tiny bench run through both stax modes and one graph
change through Redis to two proxies, asserting on what they measured. Each runs as a
subprocess (the bench pins its own process to a core)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bench_measures_both_stax_modes(tmp_path):
    out = tmp_path / "bench.json"
    _run(["loadtests.bench", "--targets", "python-floor,stax-gateway,stax-sidecar", "--bodies", "small",
          "--connections", "8", "--rounds", "1", "--duration", "1", "--no-scale",
          "--out", str(out)], timeout=60)
    data = json.loads(out.read_text())
    rows = {r["target"]: r for r in data["summary"]}
    assert set(rows) == {"python-floor", "stax-gateway", "stax-sidecar"}
    for row in rows.values():
        assert row["errors"] == 0
        assert row["rps"] > 0  # it measured traffic (speed itself is the bench's job, not a test's)
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["cpu_us_per_req"] > 0 and row["rss_peak_mb"] > 10
    assert data["comparable"] == (shutil.which("wrk") is not None)


def test_bench_traced_targets_export_over_otlp(tmp_path):
    """stax's OTLP exporter, for real: every request traced exports its two spans to the bench's
    sink; with a 1% trace-id sampler only a few do."""
    out = tmp_path / "bench.json"
    _run(["loadtests.bench", "--targets", "stax-gateway-otlp,stax-gateway-otlp-1pct", "--bodies", "small",
          "--connections", "8", "--rounds", "1", "--duration", "1", "--no-scale", "--out", str(out)],
         timeout=120)
    spans = json.loads(out.read_text())["otlp_spans"]
    assert set(spans) == {"stax-gateway-otlp", "stax-gateway-otlp-1pct"}
    assert 1.5 <= spans["stax-gateway-otlp"]["per_request"] <= 2.2, spans
    assert 0 < spans["stax-gateway-otlp-1pct"]["per_request"] < 0.2, spans


def test_bench_graph_scale_runs_every_traffic_shape(tmp_path):
    out = tmp_path / "bench.json"
    _run(["loadtests.bench", "--targets", "stax-gateway", "--bodies", "small", "--connections", "8",
          "--rounds", "1", "--duration", "1", "--scale-envs", "300", "--scale-rounds", "1",
          "--out", str(out)], timeout=120)
    scale = json.loads(out.read_text())["scale"]
    assert scale["graph"]["envs"] == 300
    assert set(scale["summary"]) == {"3-env", "10k-env, 3 envs", "10k-env", "10k-env reloading"}
    for row in scale["summary"].values():
        assert row["errors"] == 0 and row["rps"] > 0 and row["cpu_us_per_req"] > 0
    assert scale["throughput_ratio_10k_vs_3_same_traffic"] > 0 and scale["cpu_ratio_10k_vs_3"] > 0


def test_scale_traffic_mix_matches_the_small_graph(tmp_path):
    """The '3 envs' run drives the big graph with the kinds the 3-env graph's traffic has."""
    from loadtests.bench.scale import three_envs
    from loadtests.common import SMALL_ENVS, big_graph, small_graph
    from resolver.sources.file import load_file

    kinds = []
    for doc, envs in ((big_graph("127.0.0.1:9"), None), (small_graph("127.0.0.1:9"), SMALL_ENVS)):
        path = tmp_path / "g.json"
        path.write_text(json.dumps(doc))
        snap = load_file(str(path))
        kinds.append(sorted(snap.resolve(e, "bench").kind for e in envs or three_envs(doc)))
    assert kinds[0] == kinds[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_propagation_reaches_every_proxy(tmp_path):
    out = tmp_path / "prop.json"
    _run(["loadtests.propagation", "--proxies", "2", "--changes", "1", "--sizes", "10",
          "--gap", "0", "--out", str(out)], timeout=60)
    (result,) = json.loads(out.read_text())["results"]
    (change,) = result["changes"]
    assert result["envs"] == 10 and change["version"] == 2
    assert len(change["ms"]) == 2
    # measured from the commit in Redis (its delta-stream id), which precedes any proxy's swap
    # on the same clock; before, it was from push returning and a fast proxy came out negative
    assert all(0 <= ms < 60_000 for ms in change["ms"]), change["ms"]


def test_locust_scenarios_cover_every_resolution_kind():
    pytest.importorskip("locust")
    sys.path.insert(0, str(ROOT))
    from loadtests.locustfile import SCENARIOS, headers_for

    kinds = {s[4].split(":")[0] for s in SCENARIOS if not s[4].startswith("!")}
    assert kinds == {"local", "ancestor", "baseline", "shared"}
    h = headers_for("orders", "feature-1", "baggage")
    assert h["Host"] == "orders" and h["baggage"].startswith("stax.env=feature-1,")
