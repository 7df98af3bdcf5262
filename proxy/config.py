"""One typed config for a proxy process, parsed once from flags, `STAX_*` environment and an
optional YAML file (precedence: flag > environment > file > default). Nothing else reads
os.environ; tests build ProxyConfig directly."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields

from resolver.validate import NAME_RE, excerpt, valid_name


@dataclass
class ProxyConfig:
    mode: str = "gateway"  # gateway | sidecar
    graph: str | None = None
    redis: str | None = None
    redis_prefix: str = "stax:"
    graph_cache: str | None = None
    regression_hold: float = 30.0
    listen: str = "0.0.0.0:8080"
    admin: str = "127.0.0.1:9901"
    # gateway
    default_env: str | None = None
    env_host_suffix: str | None = None
    route_prefix: list[str] = field(default_factory=list)  # "/p=svc"
    context_policy: str = "open"
    context_allow: list[str] = field(default_factory=list)
    env_token_key: str | None = None
    trusted_proxies: list[str] = field(default_factory=list)
    # sidecar
    env: str | None = None
    service: str | None = None
    app: str | None = None
    egress: str = "127.0.0.1:15001"
    # limits and timeouts
    max_hops: int = 32
    max_head_bytes: int = 32 * 1024
    max_response_head_bytes: int = 64 * 1024
    max_header_count: int = 100
    max_baggage_bytes: int = 8192
    max_baggage_members: int = 64
    max_inflight: int = 10000
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    drain_timeout: float = 20.0
    connect_timeout: float = 5.0
    pool_max_idle: int = 128
    pool_idle_timeout: float = 60.0
    upstream_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    outlier_failures: int = 5
    outlier_ejection: float = 30.0
    log_level: str = "info"
    access_log: bool = False
    otel_traces_exporter: str | None = None  # from the standard OTEL_TRACES_EXPORTER

    def host_port(self, which: str) -> tuple[str, int]:
        return split_host_port(getattr(self, which))


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return (host.strip("[]") or "0.0.0.0"), int(port)


_HELP = {
    "graph": "graph file (YAML/JSON), reloaded on change",
    "redis": "Redis URL of the graph store (redis://, rediss://, redis+sentinel://h:p,h:p/master/db, redis+cluster://h:p,h:p/)",
    "redis_prefix": "key prefix of the graph in Redis",
    "graph_cache": "file that keeps the last good graph, served when Redis is down at start",
    "regression_hold": "seconds a lower store version (same epoch) is held before it is adopted",
    "listen": "HOST:PORT of the proxy listener (sidecar: ingress)",
    "admin": "HOST:PORT of the admin port (/healthz /readyz /metrics /debug/*)",
    "default_env": "env of a request with no context (default: the graph's baseline)",
    "env_host_suffix": "read the env from Host: <service>.<env>.<suffix>",
    "route_prefix": "PATH=SERVICE; route by path prefix (repeatable; longest match wins)",
    "context_policy": "which env context the edge honours: open | allow-list | signed",
    "context_allow": "allow-list policy: envs clients may ask for (comma-separated)",
    "env_token_key": "file with the HMAC key of signed env tokens (signed policy, private envs)",
    "trusted_proxies": "peer IPs or networks (10.0.0.0/8) whose X-Forwarded-* headers are kept (comma-separated)",
    "env": "sidecar: this instance's env (and the env of requests with no context)",
    "service": "sidecar: the service this sidecar fronts",
    "app": "sidecar: HOST:PORT of the local app",
    "egress": "sidecar: HOST:PORT for the app's outbound calls",
    "max_hops": "stax hops before 508 loop_detected",
    "max_head_bytes": "largest request head (431 beyond)",
    "max_response_head_bytes": "largest upstream response head (502 upstream_bad_response beyond)",
    "max_header_count": "most header fields (431 beyond)",
    "max_baggage_bytes": "largest baggage header (431 beyond)",
    "max_baggage_members": "most baggage members (431 beyond)",
    "max_inflight": "in-flight requests before 503 overloaded",
    "header_timeout": "seconds to receive a request head (408 beyond)",
    "keepalive_timeout": "seconds an idle client connection is kept",
    "drain_timeout": "seconds in-flight requests get after SIGTERM",
    "connect_timeout": "seconds to connect to an upstream",
    "pool_max_idle": "idle keep-alive connections kept per endpoint",
    "pool_idle_timeout": "seconds an idle upstream connection is kept",
    "upstream_ca": "CA bundle for https:// endpoints (default: system trust store)",
    "tls_cert": "gateway: certificate for edge TLS",
    "tls_key": "gateway: private key for edge TLS",
    "outlier_failures": "consecutive failures that eject an endpoint",
    "outlier_ejection": "base ejection seconds (times the endpoint's ejection count)",
    "log_level": "debug | info | warning | error",
    "otel_traces_exporter": "span exporter: console | otlp | none (also the standard OTEL_TRACES_EXPORTER)",
    "access_log": "log one JSON line per request (off: it costs on the hot path)",
}

_GATEWAY_ONLY = {"default_env", "env_host_suffix", "route_prefix", "context_policy",
                 "context_allow", "env_token_key", "trusted_proxies", "tls_cert", "tls_key"}
_SIDECAR_ONLY = {"env", "service", "app", "egress"}


def add_proxy_args(parser: argparse.ArgumentParser, mode: str) -> None:
    defaults = ProxyConfig()
    for f in fields(ProxyConfig):
        if f.name == "mode" or (mode == "sidecar" and f.name in _GATEWAY_ONLY) or (
                mode == "gateway" and f.name in _SIDECAR_ONLY):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = f" (default: {default})" if default not in (None, [], "") else ""
        env = "STAX_" + f.name.upper()
        help_text = f"{_HELP.get(f.name, '')}{shown} [env {env}]"
        if f.name == "listen" and mode == "sidecar":
            default = "0.0.0.0:15000"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, action="append", default=None, help=help_text)
        elif f.name == "context_policy":
            parser.add_argument(flag, choices=["open", "allow-list", "signed"], default=None, help=help_text)
        else:
            typ = type(default) if default is not None else str
            parser.add_argument(flag, type=typ, default=None, help=help_text)
    parser.add_argument("--config", help="YAML file of settings (keys as flags, with _ or -)")
    parser.add_argument("--check-config", action="store_true",
                        help="parse and validate the configuration (and graph file), then exit")


def config_from_args(args: argparse.Namespace, mode: str, environ: dict | None = None) -> ProxyConfig:
    """flag > STAX_* environment > --config file > default."""
    environ = os.environ if environ is None else environ
    file_values: dict = {}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        file_values = {k.replace("-", "_"): v for k, v in loaded.items()}
    cfg = ProxyConfig(mode=mode)
    if mode == "sidecar":
        cfg.listen = "0.0.0.0:15000"
    known = {f.name: f for f in fields(ProxyConfig)}
    unknown = set(file_values) - set(known)
    if unknown:
        raise ValueError(f"unknown setting(s) in config file: {sorted(unknown)}")
    for name in known:
        if name == "mode":
            continue
        value = getattr(args, name, None)
        if value is None and "STAX_" + name.upper() in environ:
            value = _coerce(environ["STAX_" + name.upper()], getattr(cfg, name), name)
        if value is None and name in file_values:
            value = file_values[name]
        if value is not None:
            if isinstance(getattr(cfg, name), list):  # repeated, comma-separated or both
                value = _split_list(value)
            setattr(cfg, name, value)
    if cfg.otel_traces_exporter is None and environ.get("OTEL_TRACES_EXPORTER"):
        cfg.otel_traces_exporter = environ["OTEL_TRACES_EXPORTER"]
    _validate(cfg)
    return cfg


def _split_list(value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value  # _check_settings names the problem
    return [v.strip() for item in value for v in item.split(",") if v.strip()]


def _coerce(raw: str, default, name: str):
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"STAX_{name.upper()}={raw!r} is not a number") from None
    return raw


_MAY_BE_ZERO = {"pool_max_idle", "drain_timeout", "regression_hold"}  # 0 means "none"/"at once"
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_settings(cfg: ProxyConfig) -> None:
    """Every setting of its type and every number in its range, whichever of flag, environment
    or file set it: a 0 in-flight limit, a negative or NaN timeout would start a proxy that
    fails every request."""
    defaults = ProxyConfig()
    for f in fields(ProxyConfig):
        default, value = getattr(defaults, f.name), getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {excerpt(value)}")
        elif isinstance(default, (int, float)):
            kind = "an integer" if isinstance(default, int) else "a number"
            ok_type = isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not math.isfinite(value):
                raise ValueError(f"{flag} must be {kind}, got {excerpt(value)}")
            if f.name in _MAY_BE_ZERO and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {excerpt(value)}")
            if f.name not in _MAY_BE_ZERO and value <= 0:
                raise ValueError(f"{flag} must be > 0, got {excerpt(value)}")
        elif isinstance(default, list):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{flag} must be a list of strings, got {excerpt(value)}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{flag} must be a string, got {excerpt(value)}")
    if cfg.log_level not in _LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(_LOG_LEVELS)}, got {excerpt(cfg.log_level)}")


def _validate(cfg: ProxyConfig) -> None:
    _check_settings(cfg)
    if bool(cfg.graph) == bool(cfg.redis):
        raise ValueError("give exactly one graph source: --graph FILE or --redis URL")
    if cfg.redis:
        from resolver.sources.redis_store import check_url  # redis-py loads only for a Redis source

        check_url(cfg.redis)
    addrs = ["listen", "admin"] + (["egress", "app"] if cfg.mode == "sidecar" else [])
    for name in addrs:
        if getattr(cfg, name) is None:
            raise ValueError(f"--{name} is required")
        split_host_port(getattr(cfg, name))
    if cfg.mode == "sidecar":
        for name in ("env", "service"):
            if not getattr(cfg, name):
                raise ValueError(f"--{name} is required for a sidecar")
    for spec in cfg.route_prefix:
        prefix, sep, svc = spec.partition("=")
        if not sep or not prefix.startswith("/") or not valid_name(svc):
            raise ValueError(f"--route-prefix {spec!r}: want /PATH=SERVICE (a service name is {_NAME})")
    names = [("--default-env", cfg.default_env), *(("--context-allow", e) for e in cfg.context_allow)]
    if cfg.mode == "sidecar":
        names += [("--env", cfg.env), ("--service", cfg.service)]
    for flag, name in names:
        if name is not None and not valid_name(name):  # could never match a graph's name
            raise ValueError(f"{flag} {excerpt(name)} is not a valid name ({_NAME})")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if cfg.context_policy == "allow-list" and not cfg.context_allow:
        raise ValueError("--context-policy allow-list needs --context-allow E1,E2")
    if cfg.context_policy == "signed" and not cfg.env_token_key:
        raise ValueError("--context-policy signed needs --env-token-key FILE")
    _check_files(cfg)


_NAME = NAME_RE.pattern


def edge_tls(cfg: ProxyConfig):
    """The gateway's server-side TLS context, or None."""
    if not cfg.tls_cert:
        return None
    import ssl

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return tls


def _check_files(cfg: ProxyConfig) -> None:
    """Load what the proxy loads at start (certificates, CA bundle, token key, trusted
    networks), so a bad one is a usage error naming its flag, and --check-config finds it."""
    from .stages.policy import load_key
    from .stages.sanitize import TrustedPeers
    from .upstream_pool import make_ssl_context

    try:
        TrustedPeers(cfg.trusted_proxies)
    except ValueError as exc:
        raise ValueError(f"--trusted-proxies: {exc}") from None
    for what, load in ((f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}", lambda: edge_tls(cfg)),
                       (f"--upstream-ca {cfg.upstream_ca}", lambda: make_ssl_context(cfg.upstream_ca)),
                       (f"--env-token-key {cfg.env_token_key}", lambda: load_key(cfg.env_token_key))):
        try:
            load()
        except OSError as exc:  # ssl.SSLError included
            raise ValueError(f"{what}: cannot load it: {exc.strerror or exc}") from None
