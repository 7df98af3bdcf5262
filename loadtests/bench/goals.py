"""The performance goals stax is held to (issue #5), checked against one bench run's numbers.

Each goal reads ratios the bench already computed (medians of per-round paired ratios), so
its verdict is as good as the run: on a noisy machine, read it next to the spread column.
A goal whose cells were not measured (a `--quick` or `--targets` run) is left out.
"""

from __future__ import annotations

STAX = ("stax-gateway", "stax-sidecar")


def _cells(summary: list[dict], body: str, conns: int | None, key: str) -> dict[str, float]:
    return {s["target"] if conns is not None else f"{s['target']} c={s['connections']}": s[key]
            for s in summary
            if s["target"] in STAX and s["body"] == body
            and (conns is None or s["connections"] == conns) and s.get(key) is not None}


def evaluate(summary: list[dict], scale: dict | None) -> list[dict]:
    """[{goal, values: {what: value}, bound, at_least, met}] for what this run measured."""
    goals = []

    def add(goal: str, values: dict, bound: float, at_least: bool) -> None:
        if values:
            met = all((v >= bound) if at_least else (v <= bound) for v in values.values())
            goals.append({"goal": goal, "values": values, "bound": bound, "at_least": at_least,
                          "met": met})

    add("req/s ÷ Envoy, small body, 64 connections", _cells(summary, "small", 64, "rps_vs_envoy"),
        2.0, True)
    add("req/s ÷ nginx, small body, 64 connections", _cells(summary, "small", 64, "rps_vs_nginx"),
        0.6, True)
    add("p99 ÷ nginx's, small body, 8 connections", _cells(summary, "small", 8, "p99_vs_nginx"),
        2.0, False)
    add("req/s ÷ nginx, 1 MiB bodies", _cells(summary, "1m", None, "rps_vs_nginx"), 0.7, True)
    add("peak RSS MB under load, 3-env bench graph",
        {t: max(s["rss_peak_mb"] for s in summary if s["target"] == t and s["rss_peak_mb"])
         for t in STAX if any(s["target"] == t and s["rss_peak_mb"] for s in summary)}, 64, False)
    if scale:
        add("req/s, 10,000-env graph ÷ 3-env graph", {
            "same 3-env traffic": scale["throughput_ratio_10k_vs_3_same_traffic"],
            "traffic over all envs": scale["throughput_ratio_10k_vs_3"]}, 0.95, True)
        add("p99 while the 10,000-env graph reloads ÷ steady",
            {"stax-gateway": scale["p99_ratio_reloading_vs_steady"]}, 2.0, False)
    return goals


def table(goals: list[dict]) -> str:
    out = ["goals (issue #5) in this run:"]
    for g in goals:
        values = ", ".join(f"{k} {v:.2f}" for k, v in g["values"].items())
        bound = f"{'≥' if g['at_least'] else '≤'} {g['bound']:g}"
        out.append(f"  {'met    ' if g['met'] else 'NOT met'}  {g['goal']} {bound}: {values}")
    return "\n".join(out)
