"""Graph scale: stax gateway with a 3-env graph vs a 10,000-env x 50-service graph, driven two
ways: with the same 3-env traffic (what the graph's size costs) and with each request naming a
random env of the graph (what 10,000 distinct request contexts cost on top: memory locality).
A 3-env graph driven by as many distinct baggage values (`3-env, 10k contexts`, per-user
members) shows what that diversity costs any graph, apart from the graph's size (reported;
the goal stays against the 3-env graph's 3 values).
Then, on another gateway with the big graph, p99 while its file is rewritten every second (each
rewrite moves one overlay, so each is a real reload), and its rotating traffic right after.

The reloads run on their own gateway so that each cell measures one state: the steady cells a
gateway that never reloaded, the after-reloads cell one that just did. When they shared one,
the steady cells' median moved with the number of rounds (until 2026-12-04 a reload made the
next seconds of rotating traffic pay for re-carrying every answer on first use; see
loadtests/README.md, "Found: the first pass after a reload")."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import orjson

from ..common import SMALL_ENVS, big_graph, env_names, memory_kb, move_overlay, small_graph
from .load import LoadSpec, run_load
from .targets import Target, start_stax_gateway

# The 3-env graph with as many distinct baggage values as the big graph has envs (per-user
# members): what diverse traffic costs any graph; "10k-env" ÷ this is the graph's cost alone.
CONTEXTS = "3-env, 10k contexts"

# JSON key suffix -> (cell, the cell it is divided by)
RATIOS = {"10k_vs_3": ("10k-env", "3-env"),
          "10k_vs_3_same_traffic": ("10k-env, 3 envs", "3-env"),
          "10k_after_reloads_vs_3": ("10k-env after reloads", "3-env"),
          "3_contexts_vs_3": (CONTEXTS, "3-env"),
          "10k_vs_3_contexts": ("10k-env", CONTEXTS),
          "10k_after_reloads_vs_3_contexts": ("10k-env after reloads", CONTEXTS)}


def three_envs(doc: dict) -> list[str]:
    """Three envs of a big_graph() with the resolution kinds SMALL_ENVS have in the 3-env graph:
    the baseline, a team env overlaying `bench` and (where the graph is big enough to have
    feature envs) a child of it that inherits it. The same traffic mix on both graphs isolates
    what the graph's size costs."""
    envs = doc["envs"]
    local = next(n for n, e in envs.items() if n != doc["baseline"] and "bench" in e["services"])
    child = next((n for n, e in envs.items() if e.get("parent") == local and "bench" not in e["services"]),
                 next(n for n, e in envs.items() if n != doc["baseline"] and "bench" not in e["services"]))
    return [doc["baseline"], local, child]


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


def graph_version(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as r:
        return json.load(r)["graph_version"]


class Rewriter(threading.Thread):
    """Rewrites the graph file every `every` seconds, moving one overlay each time."""

    def __init__(self, path: Path, doc: dict, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.path, self.doc, self.every = path, doc, every
        self.stopped = threading.Event()
        self.writes = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.writes += 1
            move_overlay(self.doc, self.writes)
            _write(self.path, self.doc)


def process_memory(pids: list[int]) -> list[dict]:
    """Each process of a gateway (the proxy, its graph-file helper, multiprocessing's resource
    tracker) with its RSS now and its peak, in MB: the bench's RSS column is their sum."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            kb = memory_kb(pid)
        except OSError:
            continue
        role = ("resource tracker" if b"resource_tracker" in cmd
                else "graph-file helper" if b"spawn_main" in cmd else "proxy")
        out.append({"role": role, "pid": pid, "rss_mb": kb["VmRSS"] / 1024, "peak_mb": kb["VmHWM"] / 1024})
    return out


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _paired_rounds(results: dict[str, list[dict]], name: str, ref: str, key: str) -> list[float]:
    """`name`'s `key` ÷ `ref`'s in each round, as the main table's ratios are taken: rounds are
    interleaved, so a slow spell of the machine hits both sides of a pair (a ratio of medians
    would pair rounds that ran minutes apart)."""
    return [a[key] / b[key] for a, b in zip(results[name], results[ref], strict=True)]


def _paired(results: dict[str, list[dict]], name: str, ref: str, key: str) -> float:
    """The median over rounds of the paired ratios."""
    return statistics.median(_paired_rounds(results, name, ref, key))


def summarize(rows: list[dict]) -> dict:
    return {"rounds": len(rows), "rps": _median(rows, "rps"), "p50_ms": _median(rows, "p50_ms"),
            "p99_ms": _median(rows, "p99_ms"), "max_ms": max(r["max_ms"] for r in rows),
            "cpu_us_per_req": _median(rows, "cpu_us_per_req"),
            "rss_peak_mb": max(r["rss_peak_mb"] for r in rows),
            "errors": sum(r["errors"] + r["non2xx"] for r in rows),
            "foreign_cpu": max(r["foreign_cpu"] or 0 for r in rows)}


def _measure(tmp: Path, small_gw: Target, contexts_gw: Target, big_gw: Target, reload_gw: Target,
             big: dict, reload_path: Path, *, rounds: int, duration: int, connections: int,
             python_load: bool, log) -> tuple:
    """Per round: the steady cells, then the reloading gateway under rewrites and right after."""
    specs = {"3-env": (small_gw, LoadSpec(small_gw.port, "/small", envs=SMALL_ENVS)),
             CONTEXTS: (contexts_gw, LoadSpec(contexts_gw.port, "/small", envs=SMALL_ENVS,
                                              users=len(big["envs"]))),
             "10k-env, 3 envs": (big_gw, LoadSpec(big_gw.port, "/small", envs=three_envs(big))),
             "10k-env": (big_gw, LoadSpec(big_gw.port, "/small", envs=env_names(big)))}
    rotating = LoadSpec(reload_gw.port, "/small", envs=env_names(big))
    results: dict[str, list[dict]] = {name: [] for name in specs}
    results["10k-env reloading"] = []
    results["10k-env after reloads"] = []
    reloads = []

    def load(gw: Target, spec: LoadSpec) -> dict:
        return run_load(spec, connections=connections, duration=duration, pids=gw.pids(), tmp=tmp,
                        python_load=python_load)

    def run(name: str, gw: Target, spec: LoadSpec, r: int) -> None:
        res = load(gw, spec)
        results[name].append(res)
        log(f"  round {r + 1} {name}: {res['rps']:,.0f} req/s, p99 {res['p99_ms']:.2f} ms")

    for _gw, spec in [*specs.values(), (reload_gw, rotating)]:  # warm: memoize resolutions, fill pools
        run_load(spec, connections=connections, duration=1, pids=[], tmp=tmp, python_load=python_load)
    for r in range(rounds):  # interleaved: the steady cells, reloading, after reloads, then again
        for name, (gw, spec) in specs.items():
            run(name, gw, spec, r)
        before = graph_version(reload_gw.admin)
        rewriter = Rewriter(reload_path, big)
        rewriter.start()
        try:
            res = load(reload_gw, rotating)
        finally:
            rewriter.stopped.set()
            rewriter.join()
        time.sleep(1.5)  # let the last rewrite land before reading the version
        res["reloads"] = applied = graph_version(reload_gw.admin) - before
        reloads.append({"writes": rewriter.writes, "applied": applied})
        results["10k-env reloading"].append(res)
        log(f"  round {r + 1} 10k-env reloading: {res['rps']:,.0f} req/s, p99 "
            f"{res['p99_ms']:.2f} ms, {applied} reloads applied of {rewriter.writes} writes")
        run("10k-env after reloads", reload_gw, rotating, r)
    return results, reloads


def run_scale(tmp: Path, upstream: int, *, rounds: int, duration: int, connections: int,
              python_load: bool, envs: int = 10_000, services: int = 50, log=print) -> dict:
    upstream_addr = f"127.0.0.1:{upstream}"
    small_path, big_path = tmp / "graph-small.json", tmp / "graph-big.json"
    reload_path = tmp / "graph-big-reloading.json"
    _write(small_path, small_graph(upstream_addr))
    big = big_graph(upstream_addr, envs=envs, services=services)
    _write(big_path, big)
    _write(reload_path, big)
    log(f"graph scale: {len(big['envs'])} envs x {services} services, "
        f"{big_path.stat().st_size / 1e6:.1f} MB JSON; starting four gateways")
    with contextlib.ExitStack() as cleanup:
        gateways = []
        # the diverse 3-env traffic has a gateway of its own: the 3-env cell's memos stay as
        # they were before that cell existed, 3 values
        for path, name in ((small_path, "stax-gateway-3env"), (small_path, "stax-gateway-3env-contexts"),
                           (big_path, "stax-gateway-10k"), (reload_path, "stax-gateway-10k-reloading")):
            gateways.append(start_stax_gateway(tmp, path, name=name))
            cleanup.callback(gateways[-1].stop)
        small_gw, contexts_gw, big_gw, reload_gw = gateways
        results, reloads = _measure(tmp, small_gw, contexts_gw, big_gw, reload_gw, big, reload_path,
                                    rounds=rounds, duration=duration, connections=connections,
                                    python_load=python_load, log=log)
        processes = process_memory(big_gw.pids())
        reloaded = process_memory(reload_gw.pids())
    summary = {name: summarize(rows) for name, rows in results.items()}
    return {
        "graph": {"envs": len(big["envs"]), "services": services,
                  "bytes": big_path.stat().st_size},
        "connections": connections, "duration_s": duration,
        "runs": results, "summary": summary, "reloads": reloads, "processes_10k": processes,
        "processes_10k_reloaded": reloaded,
        # throughput_ratio_<x> and cpu_ratio_<x>, each cell's ÷ its reference, round by round.
        # The `_contexts` ones: the traffic's diversity on the 3-env graph, and the big graph
        # against equally diverse traffic (its cost alone)
        **{f"{kind}_ratio_{suffix}": _paired(results, name, ref, key)
           for suffix, (name, ref) in RATIOS.items()
           for kind, key in (("throughput", "rps"), ("cpu", "cpu_us_per_req"))},
        # each round's throughput ratio: how settled a verdict on the median is
        **{f"throughput_ratio_{suffix}_rounds": _paired_rounds(results, name, ref, "rps")
           for suffix, (name, ref) in RATIOS.items()},
        # the same gateway under rewrites and right after them: the reloads' own p99 cost
        "p99_ratio_reloading_vs_steady": _paired(results, "10k-env reloading", "10k-env after reloads", "p99_ms"),
        "p99_ratio_reloading_vs_steady_rounds": _paired_rounds(results, "10k-env reloading",
                                                               "10k-env after reloads", "p99_ms"),
    }
