"""Parse and validate a graph document into a frozen Graph, collecting every problem.

A document that has any problem is rejected whole (GraphInvalid lists all of them), so
the caller's current snapshot is never touched by a bad update.
"""

from __future__ import annotations

import math
import re
import reprlib
from types import MappingProxyType
from typing import Any

import orjson
import yaml

from .errors import GraphInvalid
from .model import EMPTY, Endpoint, Env, Graph, Overlay

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ENDPOINT_RE = re.compile(
    r"(?:(?P<scheme>https?)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))"
    r":(?P<port>[0-9]{1,5})/?"
)
_ENDPOINT_ATTRS = {"region", "cluster", "jurisdiction", "zone"}
_INT_KEYS = {"timeout_ms": 1, "idle_timeout_ms": 1, "retries": 0}  # suffix -> minimum
_TOP_KEYS = {"version", "epoch", "baseline", "shared", "envs"}
_ENV_KEYS = {"parent", "services", "config", "private"}
_OVERLAY_KEYS = {"endpoints"}

try:  # the C loader is ~10x faster on big graphs; fall back when libyaml is absent
    _YamlLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _YamlLoader = yaml.SafeLoader


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


_REPR = reprlib.Repr()  # messages quote what a document holds, bounded: it may be huge
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 80, 80


def excerpt(value: object) -> str:
    """repr(value), bounded: what a message may quote of any input."""
    return _REPR.repr(value)


def _fields(keys) -> str:
    """Unknown field names, sorted as text: keys of any type (YAML allows 1: x) compare."""
    return "[" + ", ".join(sorted(excerpt(k) for k in keys)) + "]"


_JSON_START = re.compile(rb"\s*\{")


def load_document(data: bytes | str) -> Any:
    """Decode a graph file: JSON when it looks like JSON, else YAML. Raises GraphInvalid."""
    raw = data.encode() if isinstance(data, str) else data
    if not raw.strip():
        raise GraphInvalid(["document is empty"])
    try:
        if _JSON_START.match(raw):
            return orjson.loads(raw)  # bytes straight in: no text copy of a big graph
        return yaml.load(raw.decode("utf-8", "replace"), Loader=_YamlLoader)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise GraphInvalid([f"document does not parse: {exc}".replace("\n", " ")]) from None


def parse_endpoint(raw: Any) -> Endpoint:
    """Parse `host:port`, `http(s)://host:port` or `{address, weight, region, ...}`."""
    weight, attrs = 1, {}
    if isinstance(raw, dict):
        extra = set(raw) - {"address", "weight"} - _ENDPOINT_ATTRS
        if extra:
            raise ValueError(f"unknown endpoint field(s) {_fields(extra)}")
        weight = raw.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"endpoint weight must be an integer >= 0, got {excerpt(weight)}")
        attrs = {k: str(raw[k]) for k in sorted(_ENDPOINT_ATTRS & set(raw))}
        raw = raw.get("address")
    if not isinstance(raw, str):
        raise ValueError(f"endpoint must be a string 'host:port', got {excerpt(raw)}")
    m = _ENDPOINT_RE.fullmatch(raw.strip())
    if not m:
        raise ValueError(f"malformed endpoint {excerpt(raw)} (want host:port or http(s)://host:port)")
    port = int(m["port"])
    if not 0 < port < 65536:
        raise ValueError(f"endpoint {excerpt(raw)} has port out of range")
    # no attrs (the usual case): the one shared empty mapping, not a dict and a proxy each
    return Endpoint(m["scheme"] or "http", m["host"].lower(), port, weight,
                    MappingProxyType(attrs) if attrs else EMPTY)


def _overlay(where: str, service: Any, raw: Any, problems: list[str]) -> Overlay | None:
    if not valid_name(service):
        problems.append(f"{where}: bad service name {excerpt(service)} (want {NAME_RE.pattern})")
        return None
    if isinstance(raw, list):  # shorthand: a bare endpoint list
        raw = {"endpoints": raw}
    if not isinstance(raw, dict):
        problems.append(f"{where} service {service}: must be a mapping with 'endpoints'")
        return None
    extra = set(raw) - _OVERLAY_KEYS
    if extra:
        problems.append(f"{where} service {service}: unknown field(s) {_fields(extra)}")
    eps = raw.get("endpoints")
    if not isinstance(eps, list) or not eps:
        problems.append(f"{where} service {service}: endpoint list is empty or missing")
        return None
    parsed = []
    for ep in eps:
        try:
            parsed.append(parse_endpoint(ep))
        except ValueError as exc:
            problems.append(f"{where} service {service}: {exc}")
    if len(parsed) != len(eps):
        return None
    if not any(e.weight for e in parsed):
        problems.append(f"{where} service {service}: every endpoint has weight 0")
        return None
    return Overlay(service, tuple(parsed))


def _config(env: str, raw: Any, problems: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"env {env}: config must be a mapping of key: value")
        return {}
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            problems.append(f"env {env}: config key {excerpt(key)} must be a non-empty string")
            continue
        suffix = key.rsplit(".", 1)[-1]
        if suffix in _INT_KEYS:
            low = _INT_KEYS[suffix]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"env {env}: config {key} must be an integer >= {low}, got {excerpt(value)}")
                continue
        problem = _not_json(value)
        if problem is not None:
            problems.append(f"env {env}: config {key} must be JSON data: {problem}")
            continue
        out[key] = value
    return out


CONFIG_MAX_DEPTH = 32  # lists and mappings within a config value: plenty for settings
CONFIG_MAX_ITEMS = 100_000  # values within one config value, YAML aliases counted each time


def _not_json(value: Any) -> str | None:
    """What in `value` has no JSON form, else None. YAML can write NaN, dates, sets and
    unbounded integers; a graph must mean the same from a file and from Redis (JSON). Depth
    and size are bounded too: deeper than Python's recursion, printing a value fails, and YAML
    aliases can make a few lines expand to billions of items once written as JSON."""
    stack = [(value, 0)]
    seen = 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if seen > CONFIG_MAX_ITEMS:
            return f"more than {CONFIG_MAX_ITEMS:,} items (with YAML aliases expanded)"
        if v is None or isinstance(v, (bool, str)):
            continue
        if isinstance(v, int):
            if not -(1 << 63) <= v < (1 << 64):
                return f"integer {v} is out of 64-bit range"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"{excerpt(v)} is not a finite number"
        elif isinstance(v, (list, dict)):
            if depth == CONFIG_MAX_DEPTH:
                return f"lists and mappings nest more than {CONFIG_MAX_DEPTH} deep"
            if isinstance(v, dict):
                for k in v:
                    if not isinstance(k, str):
                        return f"mapping key {excerpt(k)} is not a string"
                v = list(v.values())
            stack.extend((item, depth + 1) for item in reversed(v))
        else:
            return f"{excerpt(v)} ({type(v).__name__}) has no JSON form"
    return None


def parse_graph(doc: Any, *, version: int | None = None, reuse: Graph | None = None,
                changed: frozenset | None = None) -> Graph:
    """Validate `doc` and build a Graph. `version` (from a store) overrides the document's.

    Incremental use: with `reuse` (the graph `doc` was derived from) and `changed` (the envs a
    delta set or deleted, when it touched nothing else), envs outside `changed` keep their
    already-validated Env objects; only their parent links are checked again. A one-overlay
    change to a 10,000-env graph then costs milliseconds, and gives the same Graph."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise GraphInvalid(["graph document must be a mapping with 'baseline' and 'envs'"])
    extra = set(doc) - _TOP_KEYS
    if extra:
        problems.append(f"unknown top-level field(s) {_fields(extra)}")

    if version is None:
        version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        problems.append(f"version must be an integer >= 1, got {excerpt(version)}")
        version = 1
    epoch = doc.get("epoch", "")
    if not isinstance(epoch, str):
        problems.append("epoch must be a string")
        epoch = ""

    baseline = doc.get("baseline")
    if baseline is None:
        problems.append("missing baseline: name the root env with 'baseline: NAME'")
    elif not valid_name(baseline):
        problems.append(f"bad baseline name {excerpt(baseline)}")

    shared: dict[str, Overlay] = {}
    raw_shared = doc.get("shared") or {}
    if not isinstance(raw_shared, dict):
        problems.append("shared must be a mapping of service: {endpoints: [...]}")
        raw_shared = {}
    for svc, raw in raw_shared.items():
        ov = _overlay("shared", svc, raw, problems)
        if ov:
            shared[svc] = ov

    raw_envs = doc.get("envs")
    if not isinstance(raw_envs, dict) or not raw_envs:
        problems.append("envs must be a non-empty mapping of env name: {...}")
        raw_envs = {}
    if baseline is not None and valid_name(baseline) and baseline not in raw_envs:
        problems.append(f"missing baseline: env {excerpt(baseline)} is not defined under envs")

    if (reuse is not None and changed is not None and not problems and baseline == reuse.baseline
            and len(raw_envs) == len(reuse.envs)
            and all(n in raw_envs and n in reuse.envs for n in changed)):
        # The same env names: re-validate only the changed envs (a delta's usual shape).
        return _reparse_changed(doc, raw_envs, raw_shared, shared, reuse, changed, version, epoch)

    envs: dict[str, Env] = {}
    parents: dict[str, str | None] = {}
    reusable = reuse.envs if reuse is not None and changed is not None else {}
    for name, raw in raw_envs.items():
        kept = reusable.get(name) if name not in (changed or ()) else None
        if kept is not None:
            parent = kept.parent
            if parent is not None and parent not in raw_envs:
                problems.append(f"env {name}: missing parent {excerpt(parent)} (not defined under envs)")
            parents[name] = parent
            envs[name] = kept
            continue
        env = _env(name, raw, baseline, raw_envs, raw_shared, problems)
        if env is not None:
            parents[name] = env.parent
            envs[name] = env

    problems.extend(_chain_problems(parents, baseline, raw_envs))

    if problems:
        raise GraphInvalid(problems)
    all_services = frozenset(shared) | frozenset(s for e in envs.values() for s in e.services)
    private = frozenset(n for n, e in envs.items() if e.private)
    return Graph(
        baseline, MappingProxyType(shared), MappingProxyType(envs), version, epoch, all_services,
        private,
    )


def _reparse_changed(doc: dict, raw_envs: dict, raw_shared: dict, shared: dict, reuse: Graph,
                     changed: frozenset, version: int, epoch: str) -> Graph:
    """parse_graph when only the envs in `changed` differ from `reuse` (`changed` names every
    env set or deleted; here none was added or removed, and top-level fields are unchanged): O(changed), except when a parent link moved (chains are then
    checked again) or an overlay was removed (the service set is then recomputed)."""
    problems: list[str] = []
    baseline = reuse.baseline
    envs = dict(reuse.envs)
    relinked = shrunk = False
    for name in changed:
        if name not in raw_envs:
            continue
        old = envs[name]
        env = _env(name, raw_envs[name], baseline, raw_envs, raw_shared, problems)
        if env is None:
            del envs[name]
            continue
        envs[name] = env  # in place: the document's order, as a full parse gives
        relinked = relinked or env.parent != old.parent
        shrunk = shrunk or not old.services.keys() <= env.services.keys()
    if relinked:
        problems.extend(_chain_problems({n: e.parent for n, e in envs.items()}, baseline, raw_envs))
    if problems:
        raise GraphInvalid(problems)
    if shrunk:
        all_services = frozenset(shared) | frozenset(s for e in envs.values() for s in e.services)
    else:
        all_services = reuse.services.union(*(envs[n].services for n in changed if n in envs))
    private = (reuse.private_envs - changed) | {n for n in changed if n in envs and envs[n].private}
    return Graph(
        baseline, MappingProxyType(shared), MappingProxyType(envs), version, epoch, all_services,
        frozenset(private),
    )


def _env(name: Any, raw: Any, baseline: Any, raw_envs: dict, raw_shared: dict,
         problems: list[str]) -> Env | None:
    """One env of the document, validated (problems appended); None when unusable."""
    if not valid_name(name):
        problems.append(f"bad env name {excerpt(name)} (want {NAME_RE.pattern})")
        return None
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append(f"env {name}: must be a mapping")
        return None
    extra = set(raw) - _ENV_KEYS
    if extra:
        problems.append(f"env {name}: unknown field(s) {_fields(extra)}")
    parent = raw.get("parent")
    if name == baseline:
        if parent is not None:
            problems.append(f"env {name}: the baseline cannot have a parent")
            parent = None
    elif parent is None:
        problems.append(f"env {name}: missing parent (only the baseline {excerpt(baseline)} has none)")
    elif not valid_name(parent):
        problems.append(f"env {name}: bad parent name {excerpt(parent)}")
        parent = None
    elif parent not in raw_envs:
        problems.append(f"env {name}: missing parent {excerpt(parent)} (not defined under envs)")
    services: dict[str, Overlay] = {}
    raw_services = raw.get("services") or {}
    if not isinstance(raw_services, dict):
        problems.append(f"env {name}: services must be a mapping")
        raw_services = {}
    for svc, raw_ov in raw_services.items():
        if svc in raw_shared:
            problems.append(f"env {name}: service {svc} is shared and cannot be overlaid")
            continue
        ov = _overlay(f"env {name}", svc, raw_ov, problems)
        if ov:
            services[svc] = ov
    private = raw.get("private", False)
    if not isinstance(private, bool):
        problems.append(f"env {name}: private must be true or false")
        private = False
    return Env(name, parent, MappingProxyType(services),
               MappingProxyType(_config(name, raw.get("config"), problems)), private)


def _chain_problems(parents: dict, baseline: Any, defined: dict) -> list[str]:
    """Cycles and chains that do not reach the baseline; memoized, O(envs) overall."""
    problems: list[str] = []
    reaches: dict[str, bool] = {}
    cycles: set[frozenset] = set()
    blamed = {n for n, p in parents.items() if n != baseline and (p is None or p not in defined)}
    for start in parents:
        path: list[str] = []
        on_path: set[str] = set()
        node: str | None = start
        in_cycle = False
        while node is not None and node in parents and node not in reaches:
            if node in on_path:
                cycle = path[path.index(node):]
                if frozenset(cycle) not in cycles:
                    cycles.add(frozenset(cycle))
                    problems.append(f"cycle in parents: {' -> '.join(cycle + [node])}")
                blamed.update(cycle)
                in_cycle = True
                break
            on_path.add(node)
            path.append(node)
            node = parents[node]
        if in_cycle:
            ok = False
        elif node is None:
            ok = bool(path) and path[-1] == baseline
        else:
            ok = reaches.get(node, False)
        for n in path:
            reaches[n] = ok
        if not ok and start not in blamed:
            problems.append(f"env {start}: parent chain does not reach the baseline {excerpt(baseline)}")
    return problems
