"""Context: the request's env (baggage `stax.env`, then `x-stax-env`; gateway fallbacks),
the hop counter (loop guard) and the trace context. See DESIGN.md section 3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import unquote_to_bytes

from resolver.errors import BadContext, HeadersTooLarge, LoopDetected
from resolver.validate import NAME_RE

from ..memo import remember
from ..request import Request
from ..tracing import new_span_id, new_trace_id, parse_traceparent

if TYPE_CHECKING:
    from resolver.snapshot import Route

BAGGAGE_KEY: Final = b"stax.env"


def parse_baggage(values: list[bytes], *, max_bytes: int, max_members: int) -> tuple[bytes | None, bytes]:
    """(stax.env value, the other members as received, joined by ","). Raises HeadersTooLarge /
    BadContext."""
    if not values:
        return None, b""
    total = sum(len(v) for v in values) + len(values) - 1
    if total > max_bytes:
        raise HeadersTooLarge(f"baggage is {total} bytes (limit {max_bytes})")
    env = None
    others: list[bytes] = []
    count = 0
    for value in values:
        for member in value.split(b","):
            member = member.strip()
            if not member:
                continue
            count += 1
            if count > max_members:
                raise HeadersTooLarge(f"baggage has more than {max_members} members")
            key, eq, rest = member.partition(b"=")
            if key.strip() == BAGGAGE_KEY:
                if not eq:
                    raise BadContext("baggage member stax.env has no value")
                found = rest.split(b";", 1)[0].strip()
                if b"%" in found:
                    found = unquote_to_bytes(found)
                if env is not None and found != env:
                    raise BadContext("conflicting stax.env baggage members")
                env = found
            else:
                others.append(member)
    return env, b",".join(others)


_NAMES: Final[dict[bytes, str]] = {}  # valid names seen recently: a hit skips decode + regex


def _check_name(raw: bytes, where: str) -> str:
    name = _NAMES.get(raw)
    if name is not None:
        return name
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadContext(f"invalid env name in {where}") from None
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise BadContext(f"invalid env name {shown!r} in {where}")
    return remember(_NAMES, raw, name)


def cookie_value(cookie: bytes | None, key: bytes) -> bytes | None:
    if not cookie:
        return None
    for part in cookie.split(b";"):
        k, _, v = part.strip().partition(b"=")
        if k == key:
            return v.strip().strip(b'"')
    return None


def context_lines(env: str, others: bytes) -> bytes:
    """The upstream head's context lines for `env` and the other baggage members, up to the
    traceparent's span id (which is new on every hop)."""
    name = env.encode()
    baggage = others + b",stax.env=" + name if others else b"stax.env=" + name
    return b"x-stax-env: %b\r\nbaggage: %b\r\ntraceparent: 00-" % (name, baggage)


class Parsed:
    """One baggage header value, parsed: its stax.env (raw and checked), where that name sits
    in the value, the other members and the upstream context lines they make."""

    # in the order a request reads them: with 10,000 envs in rotation each is cold memory
    __slots__ = ("name", "at", "end", "serial", "service", "route", "lines", "env", "others")

    def __init__(self, env: bytes | None, others: bytes, raw: bytes | None = None) -> None:
        name = None if env is None else _check_name(env, "baggage stax.env")
        self.name = name
        # `raw[at:end]` is the env's name when `raw`, the header's one value, can go upstream
        # as received: its one stax.env member reads `stax.env=<name>`. The forward stage then
        # copies the request's own bytes, which are in cache, rather than this env's lines.
        self.at = self.end = -1
        if name is not None and raw is not None:
            self.at, self.end = _name_span(raw, name)
        # The last route the route stage resolved for `name`: `service` on the snapshot of
        # `serial`. A request of this value skips the snapshot's memo (the env name's hash, a
        # dict entry), which with 10,000 envs in rotation is memory no other request touches.
        self.serial = 0
        self.service: str | None = None
        self.route: Route | None = None
        self.lines = None if name is None else context_lines(name, others)
        self.env = env  # as received, for x-stax-env to agree with
        self.others = others  # the other members, as received, joined by ","


def _name_span(raw: bytes, name: str) -> tuple[int, int]:
    """Where `name` sits in `raw` if its only stax.env member is exactly `stax.env=<name>` (no
    property, no percent-encoding, no spaces around "="); else (-1, -1). One "stax.env" in all
    of `raw` is that member's key, so what precedes it is a member's start."""
    member = BAGGAGE_KEY + b"=" + name.encode()
    at = raw.find(member)
    end = at + len(member)
    if at < 0 or raw.count(BAGGAGE_KEY) != 1 or raw[end:].lstrip(b" \t")[:1] not in (b"", b","):
        return -1, -1
    return at + len(BAGGAGE_KEY) + 1, end


def make_context(*, max_hops: int, max_baggage_bytes: int, max_baggage_members: int,
                 default_env, fallback=None):
    """`default_env(req)` names the env for a request with no context; `fallback(req)` (gateway)
    may find one in a cookie or subdomain when neither header is present."""

    # one baggage header value -> what it says: values repeat
    parsed_baggage: dict[bytes, Parsed] = {}

    def context(req: Request) -> None:
        raw = req.h_hops
        if raw is None:
            req.hops = 1
        else:
            raw = raw.strip()
            if not raw.isdigit() or len(raw) > 6:
                raise BadContext("x-stax-hops must be a non-negative integer")
            hops = int(raw)
            if hops >= max_hops:
                raise LoopDetected(f"{hops} stax hops (limit {max_hops}): routing loop?")
            req.hops = hops + 1

        values = req.h_baggage
        name = None
        if values is not None:
            one = values[0] if len(values) == 1 else None  # several: parsed per request
            found = parsed_baggage.get(one) if one is not None else None
            if found is None:
                env, others = parse_baggage(values, max_bytes=max_baggage_bytes,
                                            max_members=max_baggage_members)
                found = Parsed(env, others, one)
                if one is not None:
                    remember(parsed_baggage, one, found)
            # its raw stax.env is read only to compare: with 10,000 envs in rotation each entry
            # is cold, and every object touched costs a cache miss
            name = found.name
            req.parsed = found
            if name is not None and req.h_env is not None and req.h_env.strip() != found.env:
                raise BadContext("baggage stax.env and x-stax-env disagree")
        if name is not None:
            req.env = name
        elif req.h_env is not None:
            req.env = _check_name(req.h_env.strip(), "x-stax-env")
        else:
            chosen = fallback(req) if fallback is not None else None
            req.env = chosen if chosen is not None else default_env(req)

        parsed = parse_traceparent(req.h_traceparent)
        if parsed is None:
            req.trace_id = new_trace_id()
        else:
            req.trace_id, req.parent_id, req.trace_flags = parsed
        req.span_id = new_span_id()

    return context


def gateway_fallback(*, host_suffix: bytes | None):
    """Gateway only: cookie `stax-env`, then `Host: <service>.<env>.<suffix>`."""

    def fallback(req: Request) -> str | None:
        value = cookie_value(req.h_cookie, b"stax-env")
        if value is not None:
            return _check_name(value, "cookie stax-env")
        if host_suffix and req.host:
            host = req.host.split(b":", 1)[0].lower()
            if host.endswith(b"." + host_suffix):
                labels = host[: -len(host_suffix) - 1].split(b".")
                if len(labels) == 2:
                    return _check_name(labels[1], "Host subdomain")
        return None

    return fallback
