"""Mixed, realistic traffic through a stax gateway, for the Locust web UI:

    stax demo --keep                      # prints "gateway on 127.0.0.1:PORT"
    locust -f loadtests/locustfile.py --host http://127.0.0.1:PORT

The scenarios match the demo graph (baseline: web, orders, payments; team-a overlays orders;
feature-1 overlays web; auth is shared). Each request names its env the way real clients do
(W3C baggage, x-stax-env, the stax-env cookie, or nothing), and each checks where stax says
the call went (the first x-stax-route entry: `svc=kind:env@vN`), so a routing regression
shows up as failures, not just as latency. A few requests are expected errors (unknown env,
unprovided service, invalid or conflicting context) and pass only with the right status and
x-stax-error code. For another graph, edit SCENARIOS.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task

TRACE = "00-{:032x}-{:016x}-01"

# (weight, Host service, env or None, how the env is carried, expected route or error)
# expected: "kind:provider" for the first x-stax-route entry, "shared", or "!STATUS code".
SCENARIOS = [
    (20, "web", None, None, "local:baseline"),
    (15, "web", "team-a", "baggage", "baseline:baseline"),
    (10, "web", "feature-1", "baggage", "local:feature-1"),  # feature-1's web calls orders too
    (15, "orders", "feature-1", "baggage", "ancestor:team-a"),
    (10, "orders", "team-a", "x-stax-env", "local:team-a"),
    (10, "payments", "feature-1", "x-stax-env", "baseline:baseline"),
    (8, "payments", "team-a", "cookie", "baseline:baseline"),
    (8, "auth", "feature-1", "baggage", "shared"),
    (2, "web", "no-such-env", "baggage", "!404 unknown_env"),
    (1, "billing", "team-a", "x-stax-env", "!404 no_provider"),
    (1, "web", "Not_A_Name", "x-stax-env", "!400 bad_context"),
    (1, "web", "team-a", "conflict", "!400 bad_context"),
]
USERS_IN_BAGGAGE = int(os.environ.get("STAX_LOCUST_USERS", "1000"))


def headers_for(service: str, env: str | None, carrier: str | None) -> dict[str, str]:
    h = {"Host": service,
         "traceparent": TRACE.format(random.getrandbits(128) or 1, random.getrandbits(64) or 1)}
    user = f"userId=u{random.randrange(USERS_IN_BAGGAGE)}"
    if carrier == "baggage":
        h["baggage"] = f"stax.env={env},{user}"
    elif carrier == "x-stax-env":
        h["x-stax-env"] = env
    elif carrier == "cookie":
        h["Cookie"] = f"session=abc; stax-env={env}"
    elif carrier == "conflict":
        h["baggage"] = f"stax.env={env}"
        h["x-stax-env"] = "baseline"
    return h


def check(resp, expected: str) -> None:
    """Mark the request failed unless stax routed it (or refused it) as the graph says."""
    if expected.startswith("!"):
        status, code = expected[1:].split()
        if resp.status_code == int(status) and resp.headers.get("x-stax-error") == code:
            resp.success()
        else:
            resp.failure(f"want {status} {code}, got {resp.status_code} "
                         f"{resp.headers.get('x-stax-error')}")
        return
    route = (resp.headers.get("x-stax-route") or "").split(",")[0]
    where = route.split("=", 1)[-1].split("@", 1)[0]
    if resp.status_code != 200:
        resp.failure(f"status {resp.status_code} {resp.headers.get('x-stax-error')}")
    elif where != expected:
        resp.failure(f"routed {where or 'nowhere'}, want {expected}")
    else:
        resp.success()


class StaxUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def _call(self, service: str, env: str | None, carrier: str | None, expected: str) -> None:
        name = f"{service} [{env or 'no env'} via {carrier or '-'}] -> {expected}"
        with self.client.get("/", headers=headers_for(service, env, carrier), name=name,
                             catch_response=True) as resp:
            check(resp, expected)

    @task
    def mixed(self) -> None:
        weights = [s[0] for s in SCENARIOS]
        _, service, env, carrier, expected = random.choices(SCENARIOS, weights)[0]
        self._call(service, env, carrier, expected)
