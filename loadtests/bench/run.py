"""`python -m loadtests.bench`: direct vs nginx vs Envoy vs a naive aiohttp proxy vs stax
(gateway and sidecar egress), small / 16 KiB / 1 MiB bodies, 8 and 64 connections, rounds
interleaved across targets, medians; then graph scale and reload. Proxies run on core 0;
wrk, the upstream and this script on core 1."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from ..common import ROOT, http_get, parse_metrics, small_graph, tool_version, two_cores
from . import goals as bench_goals
from . import profile as prof
from .load import TRACEPARENT, LoadSpec, have_wrk, run_load
from .scale import run_scale
from .targets import (
    BODY_PATHS,
    LOAD_CORE,
    SMALL_BODY,
    Target,
    envoy_bin,
    nginx_bin,
    otlp_counts,
    start_bare,
    start_envoy,
    start_naive,
    start_nginx_proxy,
    start_otlp_sink,
    start_stax_gateway,
    start_stax_sidecar,
    start_upstream,
)

BODY_BYTES = {"small": len(SMALL_BODY), "16k": 16384, "1m": 1 << 20}
ALL_TARGETS = ["direct", "nginx", "envoy", "envoy-lua", "aiohttp-naive", "python-floor", "stax-gateway", "stax-sidecar"]
# Measured only when asked for (--targets), and reported apart: tracing with an exporter on
# (console; OTLP/HTTP to the bench's sink, every request traced or 1% by trace id), and the
# gateway with its request path interpreted (STAX_PURE=1) rather than compiled.
EXTRA_TARGETS = ["stax-gateway-otel", "stax-gateway-otlp", "stax-gateway-otlp-1pct", "stax-gateway-pure"]
# The sampled-by-ratio target gets no traceparent (an edge's usual client): each request starts
# its own trace, so the sampler keeps 1% of them (the bench's fixed trace id is all or nothing).
OTLP_TARGETS = {  # name -> (OTEL_* settings beyond the exporter, LoadSpec settings)
    "stax-gateway-otlp": ({}, {}),
    "stax-gateway-otlp-1pct": ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
                               {"traceparent": False}),
}
RESULTS = ROOT / "loadtests" / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per cell; medians are reported")
    ap.add_argument("--duration", type=int, default=5, help="seconds per load run")
    ap.add_argument("--quick", action="store_true", help="a fast smoke: 1 round of 2 s")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset")
    ap.add_argument("--bodies", default="small,16k,1m")
    ap.add_argument("--connections", default="8,64")
    ap.add_argument("--no-scale", action="store_true", help="skip the graph-scale runs")
    ap.add_argument("--scale-envs", type=int, default=10_000)
    ap.add_argument("--scale-rounds", type=int, default=5,
                    help="rounds of the graph-scale runs (a few percent between noisy runs: more rounds)")
    ap.add_argument("--profile", action="store_true",
                    help="also sample each stax mode with py-spy under load (64 conns, small body)")
    ap.add_argument("--python-load", action="store_true",
                    help="use the Python load generator even if wrk is installed (not comparable)")
    ap.add_argument("--out", help="JSON path (default loadtests/results/bench-<timestamp>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.scale_rounds = 1, 2, 1
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(ALL_TARGETS) - set(EXTRA_TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(ALL_TARGETS + EXTRA_TARGETS)}")
    args.bodies = args.bodies.split(",")
    args.connections = [int(c) for c in args.connections.split(",")]
    return args


# -- correctness of what is measured ----------------------------------------------------------


def check_target(t: Target, bodies: list[str]) -> list[str]:
    """Every body arrives whole; through stax (and Envoy's Lua twin), the upstream saw the
    rewritten context headers."""
    problems = []
    spec = LoadSpec(t.port, "/small")
    for body in bodies:
        status, headers, data = http_get(t.port, BODY_PATHS[body], spec.headers("baseline"))
        if status != 200 or len(data) != BODY_BYTES[body]:
            problems.append(f"{body}: status {status}, {len(data)} bytes")
    if not t.name.startswith(("stax", "envoy-lua")):
        return problems
    status, seen, _ = http_get(t.port, "/small", spec.headers("baseline"))
    trace, parent = TRACEPARENT.split("-")[1:3]
    tp = seen.get("x-seen-traceparent", "").split("-")
    expect = {
        "x-seen-env == baseline": seen.get("x-seen-env") == "baseline",
        "x-seen-hops == 1": seen.get("x-seen-hops") == "1",
        "baggage keeps userId=bench": "userId=bench" in seen.get("x-seen-baggage", ""),
        "baggage has stax.env=baseline": "stax.env=baseline" in seen.get("x-seen-baggage", ""),
        "traceparent continues the trace with a new span": len(tp) == 4 and tp[1] == trace and tp[2] != parent,
        "x-stax-route names bench": seen.get("x-stax-route", "").startswith("bench="),
    }
    problems += [f"{what} (saw {seen})" for what, ok in expect.items() if not ok]
    return problems


def exported_spans(sink: Target, targets: list[Target]) -> dict:
    """Spans each OTLP target exported, per request it handled (its own stax_requests_total,
    warm-up and checks included like their spans): a sampled request exports 2, so a dropped
    span shows as a shortfall. Each target is stopped first: stax exports what is still
    batched when SIGTERM ends it, so nothing waits on the batch processor's schedule."""
    out = {}
    for t in targets:
        if t.name not in OTLP_TARGETS:
            continue
        _, _, body = http_get(t.admin, "/metrics", {})
        handled = sum(sum(by_class.values())
                      for by_class in parse_metrics(body.decode())["requests"].values())
        t.stop()
        n = otlp_counts(sink).get(f"/{t.name}", 0)
        out[t.name] = {"spans": n, "requests": handled, "per_request": n / max(handled, 1)}
    return out


# -- summary ----------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["target"], r["body"], r["connections"]), []).append(r)
    out = []
    for (target, body, conns), rs in cells.items():
        def med(key: str, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]  # older JSON lacks some
            return statistics.median(vals) if vals else None
        rss = [r["rss_peak_mb"] for r in rs if r["rss_peak_mb"] is not None]
        rps = [r["rps"] for r in rs if r["rps"]]
        out.append({"target": target, "body": body, "connections": conns, "rounds": len(rs),
                    "rps": med("rps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                    "spread": max(rps) / min(rps) if rps else None,
                    "cpu_us_per_req": med("cpu_us_per_req"), "cpu_util": med("cpu_util"),
                    "user_us_per_req": med("user_us_per_req"), "kernel_us_per_req": med("kernel_us_per_req"),
                    "rss_peak_mb": max(rss) if rss else None,
                    "foreign_cpu": max((r["foreign_cpu"] or 0 for r in rs), default=None),
                    "errors": sum(r["errors"] + r["non2xx"] for r in rs)})
    index = {(s["target"], s["body"], s["connections"]): s for s in out}
    for s in out:
        for ref in ("nginx", "envoy", "envoy-lua"):
            base = index.get((ref, s["body"], s["connections"]))
            ok = base is not None and s["target"] not in ("direct", ref)
            pairs = [(f"rps_vs_{ref}", "rps"), (f"cpu_vs_{ref}", "cpu_us_per_req")]
            if ref == "nginx":  # the latency goal is stated against nginx only
                pairs.append(("p99_vs_nginx", "p99_ms"))
            for name, key in pairs:
                ratios = paired_ratios(cells, s, ref, key) if ok else []
                s[name] = statistics.median(ratios) if ratios else None
                s[f"{name}_rounds"] = ratios  # each round's: how settled a verdict on the median is
    return out


def paired_ratios(cells: dict, s: dict, ref: str, key: str) -> list[float]:
    """Target ÷ reference within each round (the table shows their median). Rounds are
    interleaved, so a slow spell of a shared machine hits both sides of each pair alike."""
    by_round = {r["round"]: r[key] for r in cells.get((ref, s["body"], s["connections"]), [])}
    return [r[key] / by_round[r["round"]] for r in cells[(s["target"], s["body"], s["connections"])]
            if r[key] and by_round.get(r["round"])]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(summary: list[dict], comparable: bool) -> str:
    note = "" if comparable else " (not comparable: Python load generator)"
    head = ["target", "body", "conns", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "kernel µs", "CPU util",
            "RSS MB", "req/s÷nginx", "req/s÷envoy", "req/s÷envoy-lua", "CPU÷nginx", "CPU÷envoy",
            "errors", "noise", "spread"]
    lines = [[s["target"], s["body"], str(s["connections"]), _fmt(s["rps"], ",.0f"),
              _fmt(s["p50_ms"], ".2f"), _fmt(s["p99_ms"], ".2f"), _fmt(s["cpu_us_per_req"], ".1f"),
              _fmt(s["kernel_us_per_req"], ".1f"),
              _fmt(s["cpu_util"], ".0%"), _fmt(s["rss_peak_mb"], ".0f"),
              _fmt(s["rps_vs_nginx"], ".2f"), _fmt(s["rps_vs_envoy"], ".2f"),
              _fmt(s["rps_vs_envoy-lua"], ".2f"), _fmt(s["cpu_vs_nginx"], ".1f"), _fmt(s["cpu_vs_envoy"], ".1f"), str(s["errors"]),
              _fmt(s["foreign_cpu"], ".0%") if s["target"] != "direct" else "-",
              _fmt(s["spread"], ".2f")]
             for s in summary]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = [f"ratios: this proxy ÷ the reference at the same body and connections, median of the "
           f"per-round ratios{note}; noise: the largest share of the proxy's core that other "
           "processes used in any round; spread: fastest ÷ slowest round of this target; kernel µs: "
           "the part of CPU µs/req spent in the kernel",
           "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    prev = None
    for row, s in zip(lines, summary, strict=True):
        if prev is not None and (s["body"], s["connections"]) != prev:
            out.append("")
        prev = (s["body"], s["connections"])
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def scale_table(scale: dict) -> str:
    s = scale["summary"]
    g = scale["graph"]
    out = [f"graph scale (stax gateway, {scale['connections']} conns, small body; 10k graph: "
           f"{g['envs']} envs x {g['services']} services, {g['bytes'] / 1e6:.1f} MB; '3 envs': the "
           f"3-env graph's traffic mix; '10k contexts': its 3 envs with as many userIds as the big graph "
           f"has envs; else each request names a random env of the graph)",
           f"{'graph':>21}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  "
           f"{'CPU µs/req':>10}  {'RSS MB':>6}  errors  noise"]
    for name, v in s.items():
        out.append(f"{name:>21}  {v['rps']:>8,.0f}  {v['p50_ms']:>7.2f}  {v['p99_ms']:>7.2f}  "
                   f"{v['max_ms']:>7.1f}  {v['cpu_us_per_req']:>10.1f}  {v['rss_peak_mb']:>6.0f}  "
                   f"{v['errors']:>6}  {v['foreign_cpu']:>5.0%}")
    applied = sum(r["applied"] for r in scale["reloads"])
    writes = sum(r["writes"] for r in scale["reloads"])
    out.append("ratios: median of the per-round ratios (rounds interleaved), as above")
    out.append(f"10k-env ÷ 3-env, same 3-env traffic: throughput "
               f"{scale['throughput_ratio_10k_vs_3_same_traffic']:.2f}, CPU per request "
               f"{scale['cpu_ratio_10k_vs_3_same_traffic']:.2f}; traffic over all envs: throughput "
               f"{scale['throughput_ratio_10k_vs_3']:.2f}, CPU per request {scale['cpu_ratio_10k_vs_3']:.2f}")
    out.append(f"10k-env after reloads ÷ 3-env, traffic over all envs: throughput "
               f"{scale['throughput_ratio_10k_after_reloads_vs_3']:.2f}, CPU per request "
               f"{scale['cpu_ratio_10k_after_reloads_vs_3']:.2f} (a gateway of its own, reloaded "
               f"by the rewrites)")
    out.append(f"3-env, 10k contexts ÷ 3-env (what {g['envs']:,} distinct baggage values cost any "
               f"graph): throughput {scale['throughput_ratio_3_contexts_vs_3']:.2f}, CPU per request "
               f"{scale['cpu_ratio_3_contexts_vs_3']:.2f}")
    out.append(f"as diverse on both graphs (the graph's own cost), 10k-env ÷ 3-env, 10k contexts: "
               f"throughput {scale['throughput_ratio_10k_vs_3_contexts']:.2f}, CPU per request "
               f"{scale['cpu_ratio_10k_vs_3_contexts']:.2f}; after reloads: throughput "
               f"{scale['throughput_ratio_10k_after_reloads_vs_3_contexts']:.2f}, CPU per request "
               f"{scale['cpu_ratio_10k_after_reloads_vs_3_contexts']:.2f}")
    out.append(f"p99 while reloading ÷ steady (the same gateway right after): "
               f"{scale['p99_ratio_reloading_vs_steady']:.2f} "
               f"({applied} reloads applied of {writes} file rewrites)")
    for key, which in (("processes_10k", "10k-env gateway's"),
                       ("processes_10k_reloaded", "reloaded 10k-env gateway's")):
        if scale.get(key):
            out.append(f"{which} processes at the end, RSS (peak): " + ", ".join(
                f"{p['role']} {p['rss_mb']:.0f} MB ({p['peak_mb']:.0f})" for p in scale[key]))
    return "\n".join(out)




def environment(args, upstream: Target, tool: str) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "pinned": two_cores(),
        "python": platform.python_version(), "load_tool": tool,
        "wrk": tool_version(["wrk", "-v"]) if have_wrk() else None,
        "nginx": tool_version([nginx_bin(), "-v"]) if nginx_bin() else None,
        "envoy": tool_version([envoy_bin(), "--version"]) if envoy_bin() else None,
        "upstream": upstream.note, "rounds": args.rounds, "duration_s": args.duration,
    }


# -- the run ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tool = "python" if args.python_load or not have_wrk() else "wrk"
    if two_cores():
        os.sched_setaffinity(0, {LOAD_CORE})  # children (wrk, upstream) inherit core 1
    else:
        log("warning: fewer than two cores (or no taskset): nothing is pinned")
    if tool == "python":
        log("warning: wrk not found (or --python-load): using the Python load generator; "
            "its numbers are NOT comparable with wrk runs")
    tmp = Path(tempfile.mkdtemp(prefix="stax-bench-"))
    targets: list[Target] = []
    rows: list[dict] = []
    profiles: dict = {}
    scale = None
    started = time.time()
    pyload = tool == "python"
    with contextlib.ExitStack() as cleanup:
        upstream = start_upstream(tmp)
        cleanup.callback(upstream.stop)
        graph = tmp / "graph.json"
        graph.write_bytes(orjson.dumps(small_graph(f"127.0.0.1:{upstream.port}")))
        starters = {
            "direct": lambda: Target("direct", upstream.port, note=f"wrk -> upstream ({upstream.note})"),
            "nginx": lambda: start_nginx_proxy(tmp, upstream.port) if nginx_bin() else None,
            "envoy": lambda: start_envoy(tmp, upstream.port),
            "envoy-lua": lambda: start_envoy(tmp, upstream.port, lua=True),
            "aiohttp-naive": lambda: start_naive(tmp, upstream.port),
            "python-floor": lambda: start_bare(tmp, upstream.port),
            "stax-gateway": lambda: start_stax_gateway(tmp, graph),
            "stax-gateway-otel": lambda: start_stax_gateway(tmp, graph, name="stax-gateway-otel",
                                                            exporter="console"),
            "stax-sidecar": lambda: start_stax_sidecar(tmp, graph, upstream.port),
            # the request path's sources interpreted (STAX_PURE=1): what compiling it buys
            "stax-gateway-pure": lambda: start_stax_gateway(tmp, graph, name="stax-gateway-pure", pure=True),
        }
        sink = None
        if OTLP_TARGETS.keys() & set(args.targets):
            sink = start_otlp_sink(tmp)
            if sink is not None:
                cleanup.callback(sink.stop)
        for name, (extra, load) in OTLP_TARGETS.items():
            starters[name] = lambda name=name, extra=extra, load=load: sink and start_stax_gateway(
                tmp, graph, name=name, exporter="otlp", load=load, otel_env={
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink.port}/{name}", **extra})
        for name in args.targets:
            t = starters[name]()
            if t is None:
                log(f"skipping {name}: not installed")
                continue
            cleanup.callback(t.stop)
            problems = check_target(t, args.bodies)
            if problems:
                raise SystemExit(f"{name} does not serve what the bench expects:\n  " + "\n  ".join(problems))
            targets.append(t)
        log(f"upstream: {upstream.note} on :{upstream.port}; targets ok: "
            + ", ".join(t.name for t in targets) + "; stax modes checked: the upstream saw "
            "x-stax-env=baseline, x-stax-hops=1, baggage kept, traceparent continued")
        for t in targets:  # warm up: pools, memoized routes, allocator
            for body in args.bodies:
                run_load(LoadSpec(t.port, BODY_PATHS[body], **t.load), connections=max(args.connections),
                         duration=1, pids=[], tmp=tmp, python_load=pyload)
        for r in range(args.rounds):  # interleaved: every target once per cell, then again
            for body in args.bodies:
                for conns in args.connections:
                    for t in targets:
                        if not t.alive():
                            raise SystemExit(f"{t.name} died; see {tmp}")
                        res = run_load(LoadSpec(t.port, BODY_PATHS[body], **t.load), connections=conns,
                                       duration=args.duration, pids=t.pids(), tmp=tmp,
                                       python_load=pyload)
                        rows.append({"target": t.name, "body": body, "connections": conns,
                                     "round": r + 1, **res})
                        log(f"round {r + 1}/{args.rounds} {body:>5} c={conns:<3} {t.name:>14}: "
                            f"{res['rps']:>9,.0f} req/s  p99 {res['p99_ms']:7.2f} ms  "
                            f"cpu {_fmt(res['cpu_us_per_req'], '.1f')} µs/req  "
                            f"noise {_fmt(res['foreign_cpu'], '.0%')}")
        spans = exported_spans(sink, targets) if sink is not None else {}
        if args.profile:
            for t in targets:
                if t.name.startswith("stax") and t.name not in OTLP_TARGETS:  # those are stopped
                    profiles[t.name] = prof.profile_under_load(
                        t, tmp=tmp, duration=max(args.duration, 10), out_dir=RESULTS,
                        python_load=pyload)
        for t in targets:
            t.stop()  # core 0 is the scale runs' now
        if not args.no_scale:
            scale = run_scale(tmp, upstream.port, rounds=args.scale_rounds, duration=args.duration,
                              connections=64, python_load=pyload, envs=args.scale_envs, log=log)
    summary = aggregate(rows)
    order = {n: i for i, n in enumerate(ALL_TARGETS + EXTRA_TARGETS)}
    summary.sort(key=lambda s: (args.bodies.index(s["body"]), s["connections"], order[s["target"]]))
    comparable = tool == "wrk"
    print()
    print(table(summary, comparable))
    for name, v in spans.items():
        print(f"{name}: the OTLP sink received {v['spans']:,} spans for the {v['requests']:,} "
              f"requests it handled ({v['per_request']:.3f} per request; a sampled request exports 2: server + client)")
    if scale:
        print()
        print(scale_table(scale))
    for name, p in profiles.items():
        print()
        print(prof.report(name, p))
    goals = bench_goals.evaluate(summary, scale)
    if goals:
        print()
        print(bench_goals.table(goals))
    env = environment(args, upstream, tool)
    notes = {t.name: t.note for t in targets}
    out = Path(args.out) if args.out else RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({
        "started": started, "environment": env, "targets": notes, "comparable": comparable,
        "summary": summary, "runs": rows, "scale": scale, "profiles": profiles, "otlp_spans": spans,
        "goals": goals,
    }, option=orjson.OPT_INDENT_2))
    print(f"\nproxies pinned to core 0, wrk + upstream on core 1: {env['pinned']}; load: {tool}; "
          f"upstream: {upstream.note}; {args.rounds} round(s) x {args.duration} s; JSON: {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0
