"""The `stax` command. Imports proxy/ only to start a mode."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from resolver.errors import GraphInvalid, StaxError, StoreUnavailable, VersionConflict
from resolver.snapshot import Snapshot
from resolver.sources.file import load_file
from resolver.validate import NAME_RE, load_document, parse_graph, valid_name

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFLICT = 0, 1, 2, 3


class _Usage(Exception):
    """Bad invocation or unreadable input: exit 2."""


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _dump(data) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def _read_doc(path: str):
    try:
        with open(path, "rb") as f:
            return load_document(f.read())
    except OSError as exc:
        raise _Usage(f"cannot read {path}: {exc.strerror}") from None


def _check_redis_url(url: str) -> None:
    from resolver.sources.redis_store import check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


async def _with_store(url: str, prefix: str, fn):
    from resolver.sources.redis_store import RedisStore

    _check_redis_url(url)
    store = RedisStore(url, prefix=prefix)
    try:
        return await fn(store)
    finally:
        await store.close()


def _load_snapshot(args) -> Snapshot:
    if args.graph:
        try:
            return load_file(args.graph)
        except OSError as exc:
            raise _Usage(f"cannot read {args.graph}: {exc.strerror}") from None

    async def read(store):
        version, _epoch, doc = await store.read()
        if doc is None:
            raise StoreUnavailable(f"no graph stored under prefix {args.redis_prefix!r}")
        return Snapshot(parse_graph(doc, version=version), source="redis")

    return asyncio.run(_with_store(args.redis, args.redis_prefix, read))


# -- commands ---------------------------------------------------------------------------------
def cmd_graph_validate(args) -> int:
    doc = _read_doc(args.file)
    try:
        graph = parse_graph(doc)
    except GraphInvalid as exc:
        _err(f"{args.file}: invalid graph ({len(exc.problems)} problem(s)):")
        for p in exc.problems:
            _err(f"  - {p}")
        return EXIT_ERROR
    overlays = sum(len(e.services) for e in graph.envs.values())
    _out(f"{args.file}: ok — version {graph.version}, baseline {graph.baseline}, "
         f"{len(graph.envs)} envs, {len(graph.services)} services "
         f"({len(graph.shared)} shared), {overlays} overlays")
    return EXIT_OK


def cmd_graph_push(args) -> int:
    doc = _read_doc(args.file)

    async def push(store):
        return await store.push(doc, expect_version=args.expect_version)

    try:
        version = asyncio.run(_with_store(args.redis, args.redis_prefix, push))
    except VersionConflict as exc:
        _err(f"push refused: expected {exc.expected}, store has {exc.actual}")
        return EXIT_CONFLICT
    except GraphInvalid as exc:
        _err(f"{args.file}: invalid graph, store unchanged:")
        for p in exc.problems:
            _err(f"  - {p}")
        return EXIT_ERROR
    _out(f"pushed {args.file}: graph version {version}")
    return EXIT_OK


def cmd_graph_show(args) -> int:
    async def read(store):
        return await store.read()

    version, epoch, doc = asyncio.run(_with_store(args.redis, args.redis_prefix, read))
    if doc is None:
        _err("no graph stored")
        return EXIT_ERROR
    doc = dict(doc, version=version)
    if epoch:
        doc["epoch"] = epoch
    _out(_dump(doc))
    return EXIT_OK


def _report_error(exc: StaxError, *, as_json: bool) -> int:
    if as_json:
        _out(_dump({"error": exc.code, "message": exc.message}))
    else:
        _err(f"{exc.code}: {exc.message}")
    return EXIT_ERROR


def cmd_resolve(args) -> int:
    snap = _load_snapshot(args)
    try:
        info = snap.explain(args.env, args.service)
    except StaxError as exc:
        return _report_error(exc, as_json=args.json)
    if args.json:
        _out(_dump(info))
        return EXIT_OK
    where = "shared" if info["kind"] == "shared" else f"{info['kind']} (env {info['provider_env']})"
    _out(f"{args.service} in {args.env} -> {where} @ graph v{info['graph_version']}")
    _out(f"endpoints: {', '.join(info['endpoints'])}")
    if info["kind"] == "shared":
        _out(f"why: {args.service} is a shared service: one provider for every env")
    for step in info["chain"]:
        _out(f"  {'*' if step['provides'] else ' '} {step['env']}: {step['why']}")
    return EXIT_OK


def cmd_config_explain(args) -> int:
    snap = _load_snapshot(args)
    try:
        effective = snap.config(args.env)
    except StaxError as exc:
        return _report_error(exc, as_json=args.json)
    if args.json:
        _out(_dump({"env": args.env, "graph_version": snap.version, "chain": list(snap.chain(args.env)),
                    "config": {k: {"value": v, "from": src} for k, (v, src) in effective.items()}}))
        return EXIT_OK
    _out(f"config of {args.env} (chain {' -> '.join(snap.chain(args.env))}, graph v{snap.version}):")
    if not effective:
        _out("  (nothing set; route defaults apply)")
    width = max((len(k) for k in effective), default=0)
    for key, (value, src) in effective.items():
        _out(f"  {key.ljust(width)} = {value!r:<10} from {src}")
    return EXIT_OK


def cmd_proxy(args, mode: str) -> int:
    from proxy.config import config_from_args

    try:
        cfg = config_from_args(args, mode)
    except (ValueError, OSError) as exc:
        raise _Usage(str(exc)) from None
    if args.check_config:
        if cfg.graph:
            try:
                load_file(cfg.graph)
            except OSError as exc:
                raise _Usage(f"cannot read {cfg.graph}: {exc.strerror}") from None
        _out(f"{mode} configuration ok")
        return EXIT_OK
    _setup_logging(cfg.log_level)
    from proxy.main import run

    try:
        run(cfg)
    except OSError as exc:  # a port in use, an unreadable certificate, ...
        _err(f"stax {mode}: cannot start: {exc}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_token(args) -> int:
    from proxy.stages.policy import load_key, mint_token

    if not valid_name(args.env):  # a token no gateway could ever accept
        raise _Usage(f"invalid env name {args.env!r} (want {NAME_RE.pattern})")
    if args.ttl <= 0:
        raise _Usage(f"--ttl must be above 0 seconds (got {args.ttl})")
    try:
        key = load_key(args.key)
    except OSError as exc:
        raise _Usage(f"cannot read {args.key}: {exc.strerror}") from None
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    _out(mint_token(key, args.env, args.ttl))
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.redis:
        _check_redis_url(args.redis)
    return run_demo(redis_url=args.redis, keep=args.keep)


def _setup_logging(level: str) -> None:
    from proxy.logs import setup_logging

    setup_logging(level)


# -- parser -----------------------------------------------------------------------------------
def _graph_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--graph", metavar="FILE", help="graph file (YAML/JSON)")
    src.add_argument("--redis", metavar="URL", help="Redis URL of the graph store")
    p.add_argument("--redis-prefix", default="stax:", help="key prefix in Redis (default: stax:)")


def build_parser() -> argparse.ArgumentParser:
    from proxy.config import add_proxy_args

    parser = argparse.ArgumentParser(prog="stax", description="Request routing for environment graphs.")
    sub = parser.add_subparsers(dest="command", required=True)

    graph = sub.add_parser("graph", help="validate, push and show graphs").add_subparsers(
        dest="graph_command", required=True)
    p = graph.add_parser("validate", help="check a graph file; exit 1 listing every problem")
    p.add_argument("file")
    p.set_defaults(func=cmd_graph_validate)
    p = graph.add_parser("push", help="replace the graph in Redis (version becomes current+1)")
    p.add_argument("file")
    p.add_argument("--redis", required=True, metavar="URL")
    p.add_argument("--redis-prefix", default="stax:")
    p.add_argument("--expect-version", type=int, metavar="N",
                   help="compare-and-set: refuse (exit 3) unless the store is at version N")
    p.set_defaults(func=cmd_graph_push)
    p = graph.add_parser("show", help="print the graph stored in Redis")
    p.add_argument("--redis", required=True, metavar="URL")
    p.add_argument("--redis-prefix", default="stax:")
    p.set_defaults(func=cmd_graph_show)

    p = sub.add_parser("resolve", help="where does SERVICE in ENV go, and why")
    _graph_source(p)
    p.add_argument("env")
    p.add_argument("service")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_resolve)

    cfg = sub.add_parser("config", help="layered config").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("explain", help="effective config of ENV and the env each value comes from")
    _graph_source(p)
    p.add_argument("env")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_explain)

    for mode, text in (("gateway", "run the edge gateway"), ("sidecar", "run a sidecar (ingress + egress)")):
        p = sub.add_parser(mode, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_proxy_args(p, mode)
        p.set_defaults(func=lambda a, m=mode: cmd_proxy(a, m))

    p = sub.add_parser("token", help="mint a signed env token (gateway --context-policy signed, private envs)")
    p.add_argument("--key", required=True, metavar="FILE", help="the gateway's --env-token-key file")
    p.add_argument("--env", required=True)
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid (default: 3600)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("demo", help="start demo services, a gateway and sidecars, and show routing")
    p.add_argument("--redis", metavar="URL", help="run the demo over this Redis instead of a file")
    p.add_argument("--keep", action="store_true", help="keep running after the tour (Ctrl-C to stop)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except _Usage as exc:
        _err(f"stax: {exc}")
        code = EXIT_USAGE
    except GraphInvalid as exc:
        _err("invalid graph:")
        for p in exc.problems:
            _err(f"  - {p}")
        code = EXIT_ERROR
    except StoreUnavailable as exc:
        _err(f"stax: {exc.message}")
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code) if argv is None else None
    return code


if __name__ == "__main__":
    main()
