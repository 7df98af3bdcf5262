"""The performance goals stax is held to (issue #5), checked against one bench run's numbers.

Each goal reads ratios the bench already computed (medians of per-round paired ratios), so
its verdict is as good as the run: on a noisy machine, read it next to the spread column.
A goal whose cells were not measured (a `--quick` or `--targets` run) is left out.
"""

from __future__ import annotations

STAX = ("stax-gateway", "stax-sidecar")
FLOOR = "python-floor"  # the featureless asyncio + httptools proxy: what Python itself costs


def _cells(summary: list[dict], body: str, conns: int | None, key: str) -> dict[str, float]:
    return {s["target"] if conns is not None else f"{s['target']} c={s['connections']}": s[key]
            for s in summary
            if s["target"] in STAX and s["body"] == body
            and (conns is None or s["connections"] == conns) and s.get(key) is not None}


def _floor(summary: list[dict], key: str) -> float | None:
    return next((s[key] for s in summary if s["target"] == FLOOR and s["body"] == "small"
                 and s["connections"] == 64 and s.get(key) is not None), None)


def cpu_split(summary: list[dict]) -> dict[str, tuple[float, float]]:
    """(user, kernel) CPU µs per request at small bodies and 64 connections, for Envoy, the
    floor and stax, where measured: every proxy pays about the same kernel time, so what a
    req/s ratio leaves for user time differs from machine to machine."""
    return {s["target"]: (s["user_us_per_req"], s["kernel_us_per_req"]) for s in summary
            if s["target"] in ("envoy", FLOOR, *STAX) and s["body"] == "small"
            and s["connections"] == 64 and s.get("user_us_per_req") is not None
            and s.get("kernel_us_per_req") is not None}


def headroom(bound: float, floor: float, values: dict[str, float]) -> dict:
    """A req/s goal against the featureless floor: the share of the floor's req/s that the goal
    lets features cost (negative: even the floor misses it), and what each stax mode costs."""
    return {"floor": floor, "allowed": 1 - bound / floor,
            "spent": {t: 1 - v / floor for t, v in values.items()}}


def evaluate(summary: list[dict], scale: dict | None) -> list[dict]:
    """[{goal, values: {what: value}, bound, at_least, met[, headroom]}] for what this run
    measured; a req/s goal gets its `headroom` when the python floor was measured too, and
    the Envoy goal its `cpu_split` (user, kernel µs per request) when Envoy's was. Where the
    run kept each round's ratio, a goal gets `rounds` (lowest, highest per value) and
    `straddling`: the values whose rounds fall on both sides of the bound."""
    goals = []

    def add(goal: str, values: dict, bound: float, at_least: bool, floor: float | None = None,
            rounds: dict | None = None) -> dict | None:
        """The goal's verdict, appended to `goals`; None when none of its cells was measured."""
        if not values:
            return None
        met = all((v >= bound) if at_least else (v <= bound) for v in values.values())
        verdict = {"goal": goal, "values": values, "bound": bound, "at_least": at_least, "met": met}
        goals.append(verdict)
        if floor:
            verdict["headroom"] = headroom(bound, floor, values)
        spans = {k: (min(r), max(r)) for k, r in (rounds or {}).items() if k in values and r}
        if spans:
            verdict["rounds"] = spans
            verdict["straddling"] = [k for k, (lo, hi) in spans.items() if lo < bound < hi]
        return verdict

    split = cpu_split(summary)
    for ref, key, bound in (("Envoy", "rps_vs_envoy", 2.0), ("nginx", "rps_vs_nginx", 0.6)):
        verdict = add(f"req/s ÷ {ref}, small body, 64 connections", _cells(summary, "small", 64, key),
                      bound, True, _floor(summary, key), _cells(summary, "small", 64, f"{key}_rounds"))
        if verdict is not None and ref == "Envoy" and "envoy" in split:
            verdict["cpu_split"] = split
    add("p99 ÷ nginx's, small body, 8 connections", _cells(summary, "small", 8, "p99_vs_nginx"),
        2.0, False, rounds=_cells(summary, "small", 8, "p99_vs_nginx_rounds"))
    add("req/s ÷ nginx, 1 MiB bodies", _cells(summary, "1m", None, "rps_vs_nginx"), 0.7, True,
        rounds=_cells(summary, "1m", None, "rps_vs_nginx_rounds"))
    add("peak RSS MB under load, 3-env bench graph",
        {t: max(s["rss_peak_mb"] for s in summary if s["target"] == t and s["rss_peak_mb"])
         for t in STAX if any(s["target"] == t and s["rss_peak_mb"] for s in summary)}, 64, False)
    if scale:
        keys = {"same 3-env traffic": "throughput_ratio_10k_vs_3_same_traffic",
                "traffic over all envs": "throughput_ratio_10k_vs_3",
                # runs before 2026-12-03 lack it
                "traffic over all envs, after reloads": "throughput_ratio_10k_after_reloads_vs_3"}
        ratios = {what: scale[key] for what, key in keys.items() if key in scale}
        verdict = add("req/s, 10,000-env graph ÷ 3-env graph", ratios, 0.95, True,
                      rounds={what: scale.get(f"{key}_rounds") for what, key in keys.items()})
        if verdict is not None and "throughput_ratio_3_contexts_vs_3" in scale:  # since 2026-12-04
            # Not gated: the 3-env graph driven by as many distinct baggage values as the
            # rotation brings, so what diversity costs any graph shows apart from the graph's cost
            verdict["equal_diversity"] = {
                "3-env graph, 10k contexts ÷ 3 values": scale["throughput_ratio_3_contexts_vs_3"],
                "traffic over all envs": scale["throughput_ratio_10k_vs_3_contexts"],
                "after reloads": scale["throughput_ratio_10k_after_reloads_vs_3_contexts"]}
        add("p99 while the 10,000-env graph reloads ÷ steady",
            {"stax-gateway": scale["p99_ratio_reloading_vs_steady"]}, 2.0, False,
            rounds={"stax-gateway": scale.get("p99_ratio_reloading_vs_steady_rounds")})
    return goals


def table(goals: list[dict]) -> str:
    out = ["goals (issue #5) in this run:"]
    for g in goals:
        spans = g.get("rounds", {})
        values = ", ".join(f"{k} {v:.2f}" + (" (rounds {:.2f}–{:.2f})".format(*spans[k]) if k in spans else "")
                           for k, v in g["values"].items())
        bound = f"{'≥' if g['at_least'] else '≤'} {g['bound']:g}"
        out.append(f"  {'met    ' if g['met'] else 'NOT met'}  {g['goal']} {bound}: {values}")
        if g.get("straddling"):
            out.append(f"           its rounds fall on both sides of {g['bound']:g} "
                       f"({', '.join(g['straddling'])}): the verdict is the median's, not settled; "
                       "more --rounds or a quieter machine settle it")
        h = g.get("headroom")
        if h:
            spent = ", ".join(f"{k} {v:.0%}" for k, v in h["spent"].items())
            if h["allowed"] >= 0:
                out.append(f"           {FLOOR} (no features) {h['floor']:.2f}: the goal lets features cost "
                           f"{h['allowed']:.0%} of its req/s; they cost {spent}")
            else:  # a bound past the floor is the machine's, not something features could meet
                out.append(f"           {FLOOR} (no features) {h['floor']:.2f} misses it too (it would need "
                           f"{-h['allowed']:.0%} more req/s): on this machine the bound is past what "
                           f"Python itself costs; stax's features cost {spent} of the floor's req/s")
        split = g.get("cpu_split")
        if split:
            user, kernel = split["envoy"]
            out.append("           CPU µs per request, user + kernel: "
                       + ", ".join(f"{k} {u:.1f} + {s:.1f}" for k, (u, s) in split.items())
                       + f"; {g['bound']:g}x Envoy's req/s leaves {(user + kernel) / g['bound']:.1f} in all")
        d = g.get("equal_diversity")
        if d:
            out.append("           not gated, ÷ the 3-env graph with as many distinct baggage values: "
                       + ", ".join(f"{k} {v:.2f}" for k, v in d.items()))
    return "\n".join(out)
