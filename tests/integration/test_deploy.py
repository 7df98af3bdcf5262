"""deploy/ and the Dockerfile, checked without a Docker engine or a cluster.

- The Dockerfile's claims, read statically: slim base stages, a runtime install without test
  extras, a non-root USER, an ENTRYPOINT that is a console script of pyproject.toml, a
  HEALTHCHECK on the admin port (and its command, run for real against a live admin port),
  EXPOSE'd ports equal to the proxies' defaults, COPY sources that .dockerignore lets through.
- deploy/docker-smoke.sh: shell syntax, and a clear "skipped" exit without an engine.
- deploy/kubernetes: every manifest parsed, required fields, selectors against template
  labels, Services against container ports, probes on the admin port, grace period over the
  preStop sleep plus the drain timeout, the kustomization listing every file; every stax
  container's entrypoint + args run through the real CLI with --check-config, and the graph's
  endpoints wired to the Services and sidecars that serve them.
- deploy/compose.yaml: the same checks for the one-host version, plus depends_on targets.
- deploy/kubernetes/demo_app.py: run for real behind a real gateway and sidecar, its
  outbound call crossing the egress through HTTP_PROXY.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from control.cli import build_parser, cmd_graph_push
from proxy.config import ProxyConfig, config_from_args, split_host_port
from resolver.validate import parse_graph
from tests.servers import free_port, port_of, write_graph

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
SMOKE = DEPLOY / "docker-smoke.sh"
DEMO_APP = K8S / "demo_app.py"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ServiceAccount"}


# == the Dockerfile ============================================================================
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments go, inside a continuation too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf.strip():
        logical.append(buf)
    stages: list[Stage] = []
    for line in logical:
        op, _, arg = line.partition(" ")
        op, arg = op.upper(), arg.strip()
        if op == "FROM":
            words = arg.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append((op, arg))
    return stages


def exec_form(arg: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; a shell form fails the test."""
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime(stages) -> Stage:
    return stages[-1]


def image_uid(runtime: Stage) -> int:
    user = runtime.last("USER")
    assert user, "the runtime stage sets no USER: it would run as root"
    name = user.split(":")[0]
    if name.isdigit():
        return int(name)
    created = [r for r in runtime.all("RUN") if "useradd" in r and re.search(rf"\b{name}\b", r)]
    uid = re.search(r"--uid\s+(\d+)", created[0]) if created else None
    assert uid, f"USER {name} is not created with a fixed --uid in the runtime stage"
    return int(uid.group(1))


def proxy_defaults() -> dict[str, int]:
    """The ports a proxy listens on when no flag says otherwise, from the real parser."""
    parser = build_parser()
    gw = config_from_args(parser.parse_args(["gateway", "--graph", "g.yaml"]), "gateway",
                          environ={})
    sc = config_from_args(parser.parse_args(
        ["sidecar", "--graph", "g.yaml", "--env", "e", "--service", "s", "--app", "127.0.0.1:1"]),
        "sidecar", environ={})
    return {"gateway listen": split_host_port(gw.listen)[1],
            "sidecar ingress": split_host_port(sc.listen)[1],
            "admin": split_host_port(gw.admin)[1],
            "egress": split_host_port(sc.egress)[1]}


def test_dockerfile_stages_are_slim_python_and_named(stages):
    assert len(stages) >= 2, "want a multi-stage build"
    names = [s.name for s in stages]
    assert all(names) and len(set(names)) == len(names), f"every stage named, once: {names}"
    for s in stages:
        assert s.base == "python:3.11-slim", f"stage {s.name} is FROM {s.base}"
    for i, s in enumerate(stages):
        for arg in s.all("COPY"):
            src = re.search(r"--from=(\S+)", arg)
            if src:
                assert src.group(1) in names[:i], f"stage {s.name}: COPY {arg}: no earlier stage"
    assert any("--from=" in a for a in stages[-1].all("COPY")), "the runtime copies the build"


def test_dockerfile_installs_runtime_dependencies_only(stages):
    installs = [r for s in stages[:-1] for r in s.all("RUN") if re.search(r"\bpip\b.*\binstall\b", r)]
    assert installs, "the build stage never runs pip install"
    # stax itself, with the runtime extra for OTLP span export and nothing else
    assert any(re.search(r"\binstall\s+(\.|\"\.\[otlp\]\")(\s|$)", r) for r in installs), installs
    everything = "\n".join(a for s in stages for _, a in s.instructions)
    for extra in ("[test]", "[bench]", "pytest", "hypothesis", "ruff", "locust"):
        assert extra not in everything, f"{extra} in the image"
    # the runtime stage installs nothing itself: it gets the venv from the build stage
    assert not any("pip" in r for r in stages[-1].all("RUN"))


def test_dockerfile_user_is_not_root(runtime):
    user = runtime.last("USER")
    assert user and user.split(":")[0] not in ("root", "0")
    assert image_uid(runtime) >= 1000
    group = user.partition(":")[2]
    assert group not in ("root", "0"), f"USER {user}: root group"
    # the USER comes after everything that needs root
    ops = [op for op, _ in runtime.instructions]
    last_user = len(ops) - 1 - ops[::-1].index("USER")
    assert "RUN" not in ops[last_user:], "RUN after USER: it would run as the user, or need root"


def test_dockerfile_entrypoint_is_a_console_script(runtime):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = exec_form(runtime.last("ENTRYPOINT"))
    assert entry[0] in scripts, f"ENTRYPOINT {entry} names no [project.scripts] entry"
    module, _, func = scripts[entry[0]].partition(":")
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func))


def test_dockerfile_default_command_is_a_valid_gateway(runtime):
    """CMD runs a gateway on a graph COPY'd into the image: check that configuration with
    the graph at its source path in the repository."""
    cmd = exec_form(runtime.last("CMD"))
    copies = {}
    for arg in runtime.all("COPY"):
        words = [w for w in arg.split() if not w.startswith("--")]
        if "--from=" not in arg and len(words) == 2:
            copies[words[1]] = ROOT / words[0]
    argv = [str(copies[a]) if a in copies else a for a in cmd]
    assert any(a in copies for a in cmd), f"CMD {cmd} uses no file COPY'd into the image"
    result = check_config(argv)
    assert result.returncode == 0, result.stderr


def test_dockerfile_healthcheck_probes_the_admin_port(runtime):
    hc = runtime.last("HEALTHCHECK")
    assert hc, "no HEALTHCHECK"
    opts, _, cmd = hc.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {hc}"
    for opt in ("--interval", "--timeout", "--retries"):
        assert opt in opts, f"HEALTHCHECK sets no {opt}"
    argv = exec_form(cmd)
    assert argv[:2] == ["python", "-c"], "slim images have no curl: probe with python"
    admin = proxy_defaults()["admin"]
    assert f"http://127.0.0.1:{admin}/healthz" in argv[2]


async def test_dockerfile_healthcheck_command_works(runtime, tmp_path, proxies):
    """The HEALTHCHECK's python, run for real: 0 against a live admin port, even with an
    HTTP_PROXY in the environment; non-zero once nothing answers."""
    code = exec_form(runtime.last("HEALTHCHECK").partition("CMD ")[2])[2]
    rt = await proxies("gateway", graph=str(DEPLOY / "graph.example.yaml"))
    admin = proxy_defaults()["admin"]
    probe = code.replace(f"127.0.0.1:{admin}/", f"127.0.0.1:{rt.admin_port}/")
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:1", "http_proxy": "http://127.0.0.1:1"}

    async def run() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", probe, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 15)

    assert await run() == 0
    await rt.stop()
    assert await run() != 0


def test_dockerfile_exposes_the_default_ports(runtime):
    exposed = {int(p.split("/")[0]) for arg in runtime.all("EXPOSE") for p in arg.split()}
    defaults = proxy_defaults()
    want = {defaults["gateway listen"], defaults["sidecar ingress"], defaults["admin"]}
    assert exposed == want, f"EXPOSE {sorted(exposed)}; the proxies listen on {sorted(want)}"
    assert defaults["egress"] not in exposed, "the egress binds 127.0.0.1: nothing to expose"


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip().strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies(stages):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    copied = []
    for s in stages:
        for arg in s.all("COPY"):
            if "--from=" in arg:
                continue
            words = [w for w in arg.split() if not w.startswith("--")]
            copied.extend(words[:-1])
    assert copied
    for src in copied:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, f"COPY {src}: nothing to copy"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(patterns, rel), f".dockerignore drops {rel}"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "stax.egg-info/PKG-INFO",
                 "proxy/__pycache__/config.cpython-311.pyc", "deploy/compose.yaml"):
        assert dockerignore_excludes(patterns, junk), f".dockerignore lets {junk} in"


# == deploy/docker-smoke.sh ====================================================================
def test_smoke_script_is_valid_bash():
    assert os.access(SMOKE, os.X_OK), "deploy/docker-smoke.sh is not executable"
    assert SMOKE.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(SMOKE)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def test_smoke_script_skips_clearly_without_an_engine(tmp_path):
    """A `docker` that cannot reach its engine: exit 77 with a message, nothing built."""
    calls = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                    'echo "Cannot connect to the Docker daemon at unix:///nope.sock." >&2\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run([str(SMOKE)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 77, out
    assert "no Docker engine is reachable" in out.stderr and "Cannot connect" in out.stderr
    assert "build" not in calls.read_text()


def test_smoke_script_skips_clearly_without_docker(tmp_path):
    for tool in ("dirname", "bash"):  # a PATH with what the script needs before the check
        (tmp_path / tool).symlink_to(shutil.which(tool))
    out = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True,
                         env={"PATH": str(tmp_path)}, timeout=60)
    assert out.returncode == 77, out
    assert "docker CLI is not installed" in out.stderr


# == running a container's command through the real CLI ==========================================
def stax_argv(command: list[str] | None, args: list[str] | None) -> list[str] | None:
    """The argv after `stax` of a container, or None when it does not run stax. A container
    without a command runs the image's ENTRYPOINT (["stax"])."""
    runtime = parse_dockerfile((ROOT / "Dockerfile").read_text())[-1]
    entry = command if command else exec_form(runtime.last("ENTRYPOINT"))
    if isinstance(entry, str):
        entry = shlex.split(entry)
    if entry[0] != "stax":
        return None
    return [*entry[1:], *(args or [])]


def check_config(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m control.cli ARGV --check-config` with the container's environment (and
    none of the test runner's STAX_* variables)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STAX_")}
    return subprocess.run([sys.executable, "-m", "control.cli", *argv, "--check-config"],
                          capture_output=True, text=True, env={**base, **(env or {})},
                          cwd=ROOT, timeout=60)


def parse_cli(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"stax {shlex.join(argv)}: the CLI rejects it") from exc


def proxy_config(argv: list[str], env: dict[str, str]) -> ProxyConfig:
    args = parse_cli(argv)
    return config_from_args(args, argv[0], environ=env)


def explicit_flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


SIDECAR_FLAGS = {"--env", "--service", "--app", "--listen", "--egress", "--admin", "--redis"}


# == deploy/kubernetes ===========================================================================
def k8s_objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


OBJECTS = k8s_objects()
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def of_kind(*kinds: str) -> list[dict]:
    return [d for _, d in OBJECTS if d.get("kind") in kinds]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def stax_containers() -> list[tuple[dict, dict, list[str]]]:
    """(workload, container, argv after `stax`) for every container that runs stax."""
    out = []
    for obj in of_kind("Deployment", "StatefulSet", "Job", "DaemonSet"):
        for c in containers(obj):
            argv = stax_argv(c.get("command"), c.get("args"))
            if argv is not None:
                out.append((obj, c, argv))
    return out


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def generated_configmaps() -> set[str]:
    return {g["name"] for g in KUSTOMIZATION.get("configMapGenerator", [])}


def k8s_graph() -> dict:
    cm = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "stax-graph")
    return yaml.safe_load(cm["data"]["graph.yaml"])


def test_kustomization_lists_every_file():
    resources = KUSTOMIZATION["resources"]
    assert len(resources) == len(set(resources))
    manifests = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(resources) == manifests, "kustomization resources != manifests in the directory"
    generated = {f for g in KUSTOMIZATION.get("configMapGenerator", []) for f in g["files"]}
    others = {p.name for p in K8S.iterdir() if p.is_file()} - manifests - {"kustomization.yaml"}
    assert generated == others, f"files neither a resource nor generated: {others - generated}"
    assert KUSTOMIZATION.get("namespace"), "kustomization sets no namespace"
    assert any(d["kind"] == "Namespace" and d["metadata"]["name"] == KUSTOMIZATION["namespace"]
               for _, d in OBJECTS)


@pytest.mark.parametrize("path,obj", OBJECTS, ids=[f"{p}:{d['kind']}/{d['metadata']['name']}"
                                                   for p, d in OBJECTS])
def test_manifest_required_fields(path, obj):
    for key in ("apiVersion", "kind", "metadata"):
        assert obj.get(key), f"{path}: no {key}"
    name = obj["metadata"].get("name")
    assert name and DNS_LABEL.match(name), f"{path}: bad metadata.name {name!r}"
    assert obj["kind"] not in RBAC_KINDS, "the example is RBAC-free"
    assert "namespace" not in obj["metadata"], "the kustomization sets the namespace"


def test_manifest_names_are_unique():
    keys = [(d["kind"], d["metadata"]["name"]) for _, d in OBJECTS]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("obj", of_kind("Deployment", "StatefulSet", "Job"),
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_workload_shape(obj):
    labels = obj["spec"]["template"]["metadata"]["labels"]
    if obj["kind"] != "Job":  # a Job's selector is generated
        match = obj["spec"]["selector"]["matchLabels"]
        assert match and all(labels.get(k) == v for k, v in match.items()), \
            f"selector {match} does not match the template labels {labels}"
    spec = pod_spec(obj)
    assert spec.get("serviceAccountName") is None and spec.get("automountServiceAccountToken") in (
        None, False)
    names = [c["name"] for c in containers(obj)]
    assert len(names) == len(set(names))
    known_cms = {d["metadata"]["name"] for d in of_kind("ConfigMap")} | generated_configmaps()
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in known_cms, f"volume {v['name']}: no such ConfigMap"
    for c in containers(obj):
        assert c.get("image"), c["name"]
        res = c.get("resources", {})
        assert res.get("requests", {}).get("memory") and res.get("requests", {}).get("cpu"), \
            f"{c['name']}: no cpu/memory requests"
        assert res.get("limits", {}).get("memory"), f"{c['name']}: no memory limit"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes or m["name"] in claims, f"{c['name']}: mount {m['name']}"
    if obj["kind"] == "StatefulSet":
        svc = obj["spec"]["serviceName"]
        assert any(s["metadata"]["name"] == svc for s in of_kind("Service"))


def pods_selected(service: dict) -> list[dict]:
    sel = service["spec"]["selector"]
    return [o for o in of_kind("Deployment", "StatefulSet")
            if all(o["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in sel.items())]


def container_port(obj: dict, port) -> tuple[dict, int] | None:
    """(container, number) of a container port given by name or number in a pod template."""
    for c in containers(obj):
        for p in c.get("ports", []):
            if p.get("name") == port or p["containerPort"] == port:
                return c, p["containerPort"]
    return None


@pytest.mark.parametrize("svc", of_kind("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_targets_a_container_port(svc):
    selected = pods_selected(svc)
    assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        assert container_port(selected[0], target), f"targetPort {target}: no such container port"


STAX = stax_containers()


def test_every_stax_workload_is_found():
    kinds = sorted((o["metadata"]["name"], a[0]) for o, _, a in STAX)
    assert ("stax-gateway", "gateway") in kinds
    assert ("stax-graph-push", "graph") in kinds
    assert sum(1 for _, mode in kinds if mode == "sidecar") >= 1, kinds


def stax_params(*modes: str) -> list:
    return [pytest.param(o, c, a, id=f"{o['metadata']['name']}/{c['name']}")
            for o, c, a in STAX if a[0] in modes]


@pytest.mark.parametrize("obj,container,argv", stax_params("gateway", "sidecar"))
def test_k8s_proxy_container(obj, container, argv):
    env = literal_env(container)
    result = check_config(argv, env)
    assert result.returncode == 0, f"stax {shlex.join(argv)} --check-config: {result.stderr}"
    cfg = proxy_config(argv, env)
    mode = argv[0]
    if mode == "sidecar":
        assert SIDECAR_FLAGS <= explicit_flags(argv), SIDECAR_FLAGS - explicit_flags(argv)
    # the kubelet probes the pod IP: the admin port must bind all interfaces
    admin_host, admin_port = split_host_port(cfg.admin)
    assert admin_host == "0.0.0.0", f"--admin {cfg.admin}: kubelet probes cannot reach it"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        assert get, f"{probe}: want an httpGet on the admin port"
        assert get["path"] == path
        owner, number = container_port(obj, get["port"]) or (None, None)
        assert owner is container and number == admin_port, f"{probe} port {get['port']}"
    listen_port = split_host_port(cfg.listen)[1]
    assert container_port(obj, listen_port)[0] is container, "the listener is no container port"
    # SIGKILL must never cut a drain short: grace > preStop sleep + drain timeout
    sleep = prestop_sleep(container)
    grace = pod_spec(obj).get("terminationGracePeriodSeconds", 30)
    assert grace > cfg.drain_timeout, f"grace {grace}s <= --drain-timeout {cfg.drain_timeout}s"
    assert grace > sleep + cfg.drain_timeout, \
        f"grace {grace}s <= preStop sleep {sleep}s + --drain-timeout {cfg.drain_timeout}s"
    # the image's user, enforced
    uid = image_uid(parse_dockerfile((ROOT / "Dockerfile").read_text())[-1])
    sec = {**pod_spec(obj).get("securityContext", {}), **container.get("securityContext", {})}
    assert sec.get("runAsNonRoot") is True and sec.get("runAsUser") == uid
    assert sec.get("allowPrivilegeEscalation") is False
    assert cfg.redis == graph_store_url()


def prestop_sleep(container: dict) -> int:
    """Seconds of the container's preStop sleep (exec `sleep N`, or the native sleep hook)."""
    pre = container.get("lifecycle", {}).get("preStop")
    assert pre, f"{container['name']}: no preStop hook"
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def graph_store_url() -> str:
    obj, container, argv = next(s for s in STAX if s[2][:2] == ["graph", "push"])
    return parse_cli(argv).redis


@pytest.mark.parametrize("obj,container,argv", stax_params("sidecar"))
def test_k8s_sidecar_wiring(obj, container, argv):
    """The app next to the sidecar: --app is its port on 127.0.0.1, its HTTP_PROXY is the
    egress, NO_PROXY does not send graph services around stax."""
    cfg = proxy_config(argv, literal_env(container))
    app_host, app_port = split_host_port(cfg.app)
    egress_host, egress_port = split_host_port(cfg.egress)
    assert app_host == "127.0.0.1" and egress_host == "127.0.0.1"
    owner = container_port(obj, app_port)
    assert owner and owner[0] is not container, f"--app {cfg.app}: no app container port"
    services = set(parse_graph(k8s_graph()).services)
    for c in containers(obj):
        if c is container:
            continue
        env = literal_env(c)
        assert env.get("HTTP_PROXY") == f"http://127.0.0.1:{egress_port}", c["name"]
        no_proxy = {h.strip() for h in env.get("NO_PROXY", "").split(",") if h.strip()}
        assert no_proxy, f"{c['name']}: no NO_PROXY for external hosts"
        assert not no_proxy & services, f"NO_PROXY bypasses stax for {no_proxy & services}"
        for upper in ("HTTP_PROXY", "NO_PROXY"):  # the lower-case spelling, if set, agrees
            assert env.get(upper.lower(), env[upper]) == env[upper], c["name"]


def test_k8s_graph_push_job():
    obj, container, argv = next(s for s in STAX if s[2][:2] == ["graph", "push"])
    assert obj["kind"] == "Job"
    args = parse_cli(argv)
    assert args.func is cmd_graph_push
    assert argv == ["graph", "push", "/graph/graph.yaml", "--redis", "redis://redis:6379/0"]
    mount = next(m for m in container["volumeMounts"] if args.file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"])
    cm = next(d for d in of_kind("ConfigMap")
              if d["metadata"]["name"] == volume["configMap"]["name"])
    key = os.path.relpath(args.file, mount["mountPath"])
    assert key in cm["data"], f"{args.file}: ConfigMap {cm['metadata']['name']} has no {key}"
    parse_graph(yaml.safe_load(cm["data"][key]))
    assert pod_spec(obj)["restartPolicy"] in ("OnFailure", "Never")
    assert obj["spec"].get("backoffLimit", 6) >= 3, "Redis may still be starting: retry"


def test_k8s_redis_service_matches_the_store_url():
    url = graph_store_url()
    host, port = re.match(r"redis://([^:/]+):(\d+)/", url).groups()
    svc = next(s for s in of_kind("Service") if s["metadata"]["name"] == host)
    assert any(p["port"] == int(port) for p in svc["spec"]["ports"])
    sts = pods_selected(svc)[0]
    assert sts["kind"] == "StatefulSet"
    text = (K8S / "redis.yaml").read_text()
    assert "Sentinel" in text and "managed" in text.lower() and "redis+sentinel://" in text


def endpoint_wiring(graph: dict) -> list[tuple[str, str, str, int]]:
    """(env, service, host, port) of every overlay endpoint of a graph document."""
    g = parse_graph(graph)
    out = []
    for env_name, env in g.envs.items():
        for service, overlay in env.services.items():
            out.extend((env_name, service, ep.host, ep.port) for ep in overlay.endpoints)
    return out


def test_k8s_graph_endpoints_reach_the_right_sidecars():
    """Each endpoint of the graph is a Service port that lands on the ingress of a sidecar
    started with that env and service; each sidecar is such an endpoint."""
    wired = endpoint_wiring(k8s_graph())
    assert wired
    reached = set()
    for env_name, service, host, port in wired:
        svc = next((s for s in of_kind("Service") if s["metadata"]["name"] == host), None)
        assert svc, f"{env_name}/{service}: endpoint {host}:{port} is no Service"
        sp = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
        assert sp, f"Service {host} has no port {port}"
        (workload,) = pods_selected(svc)
        target, number = container_port(workload, sp.get("targetPort", port))
        sidecars = [(c, a) for o, c, a in STAX if o is workload and a[0] == "sidecar"]
        assert len(sidecars) == 1, f"{host}: want one sidecar next to the app"
        c, argv = sidecars[0]
        cfg = proxy_config(argv, literal_env(c))
        assert target is c and split_host_port(cfg.listen)[1] == number, \
            f"{host}:{port} does not land on the sidecar ingress"
        assert (cfg.env, cfg.service) == (env_name, service), \
            f"{host}:{port} serves {env_name}/{service}, its sidecar says {cfg.env}/{cfg.service}"
        reached.add(workload["metadata"]["name"])
    sidecar_workloads = {o["metadata"]["name"] for o, _, a in STAX if a[0] == "sidecar"}
    assert sidecar_workloads == reached, f"no graph endpoint for {sidecar_workloads - reached}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    namespace = KUSTOMIZATION["namespace"]
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace, d["metadata"]["name"]
    generated = [d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"].startswith("demo-app")]
    assert len(generated) == 1 and generated[0] != "demo-app"  # hashed: a change rolls the pods
    rendered = out.stdout
    assert f"name: {generated[0]}" in rendered.split("kind: Deployment", 1)[1]
    assert len(built) == len(OBJECTS) + len(generated_configmaps())


# == deploy/compose.yaml =========================================================================
COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text())
SERVICES: dict[str, dict] = COMPOSE_DOC["services"]


def compose_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def compose_stax() -> list[tuple[str, dict, list[str]]]:
    out = []
    for name, svc in SERVICES.items():
        if svc.get("image", "").split(":")[0] != "stax":
            continue
        command = svc.get("command")
        command = shlex.split(command) if isinstance(command, str) else command
        argv = stax_argv(svc.get("entrypoint"), command)
        assert argv is not None, f"{name}: the stax image runs something else"
        out.append((name, svc, argv))
    return out


COMPOSE_STAX = compose_stax()


def depends_on(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def test_compose_structure():
    assert {"redis", "graph-push", "gateway"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        assert DNS_LABEL.match(name), name
        assert svc.get("image"), f"{name}: no image"
        for target, condition in depends_on(svc).items():
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            assert condition in ("service_started", "service_healthy",
                                 "service_completed_successfully"), condition
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck"
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            target = mode.split(":", 1)[1]
            assert target in SERVICES and target in depends_on(svc), f"{name}: {mode}"
            assert "ports" not in svc, f"{name}: ports belong to {target}, whose netns it joins"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: volume source {src} is missing"
        build = svc.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
            assert context.resolve() == ROOT
    for name, _svc, _argv in COMPOSE_STAX:
        assert SERVICES[name].get("build"), f"{name}: the stax image must be built from the repo"
    assert depends_on(SERVICES["graph-push"]).get("redis") == "service_healthy"
    assert depends_on(SERVICES["gateway"]).get("graph-push") == "service_completed_successfully"


@pytest.mark.parametrize("name,svc,argv", [s for s in COMPOSE_STAX if s[2][0] != "graph"],
                         ids=[s[0] for s in COMPOSE_STAX if s[2][0] != "graph"])
def test_compose_proxy_command(name, svc, argv):
    env = compose_env(svc)
    result = check_config(argv, env)
    assert result.returncode == 0, f"{name}: stax {shlex.join(argv)} --check-config: {result.stderr}"
    cfg = proxy_config(argv, env)
    assert cfg.redis == compose_store_url()
    host = re.match(r"redis://([^:/]+):", cfg.redis).group(1)
    assert host in SERVICES and host in depends_on(SERVICES["graph-push"])
    if argv[0] == "sidecar":
        assert SIDECAR_FLAGS <= explicit_flags(argv)
        app = svc["network_mode"].split(":", 1)[1]
        app_env = compose_env(SERVICES[app])
        assert split_host_port(cfg.app) == ("127.0.0.1", int(app_env["DEMO_PORT"]))
        egress_host, egress_port = split_host_port(cfg.egress)
        assert egress_host == "127.0.0.1"
        assert app_env["HTTP_PROXY"] == f"http://127.0.0.1:{egress_port}"
        no_proxy = {h.strip() for h in app_env.get("NO_PROXY", "").split(",")}
        assert not no_proxy & set(parse_graph(compose_graph()).services)


def compose_store_url() -> str:
    argv = next(a for _, _, a in COMPOSE_STAX if a[:2] == ["graph", "push"])
    return parse_cli(argv).redis


def compose_graph() -> dict:
    svc = SERVICES["graph-push"]
    argv = next(a for n, _, a in COMPOSE_STAX if n == "graph-push")
    path = parse_cli(argv).file
    src = next(v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == path)
    return yaml.safe_load((DEPLOY / src).read_text())


def test_compose_graph_push():
    argv = next(a for n, _, a in COMPOSE_STAX if n == "graph-push")
    assert parse_cli(argv).func is cmd_graph_push
    parse_graph(compose_graph())
    assert SERVICES["graph-push"].get("restart", "no") == "no"


def test_compose_graph_endpoints_reach_the_right_sidecars():
    """Each endpoint names a service whose network namespace holds a sidecar with that env
    and service, listening on that port."""
    wired = endpoint_wiring(compose_graph())
    assert len({s for _, s, _, _ in wired}) >= 2, "want two demo services"
    reached = set()
    for env_name, service, host, port in wired:
        sidecars = [(n, a) for n, s, a in COMPOSE_STAX
                    if a[0] == "sidecar" and s.get("network_mode") == f"service:{host}"]
        assert len(sidecars) == 1, f"endpoint {host}:{port}: want one sidecar in {host}'s netns"
        name, argv = sidecars[0]
        cfg = proxy_config(argv, compose_env(SERVICES[name]))
        assert split_host_port(cfg.listen)[1] == port
        assert (cfg.env, cfg.service) == (env_name, service), name
        reached.add(name)
    assert reached == {n for n, _, a in COMPOSE_STAX if a[0] == "sidecar"}


# == the demo app, for real ======================================================================
@contextlib.contextmanager
def demo_app_process(port: int, **env: str):
    inherited = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen(
        [sys.executable, str(DEMO_APP)],
        env={**inherited, "DEMO_PORT": str(port), "DEMO_BIND": "127.0.0.1", **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(url: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, f"{url} never answered"
            await asyncio.sleep(0.05)


async def test_demo_app_calls_through_the_egress(tmp_path, upstreams, proxies):
    """gateway -> web's sidecar -> demo app -> (HTTP_PROXY) egress -> orders in the request's
    env: the app forwards the context, so feature-1's call lands on team-a's orders."""
    orders_base, orders_a = await upstreams("orders-base", "orders-a")
    web_in, web_out, app_port = free_port(), free_port(), free_port()
    graph = write_graph(tmp_path / "graph.yaml", {
        "baseline": "baseline",
        "envs": {
            "baseline": {"services": {"web": [f"127.0.0.1:{web_in}"],
                                      "orders": [orders_base.addr]}},
            "team-a": {"parent": "baseline", "services": {"orders": [orders_a.addr]}},
            "feature-1": {"parent": "team-a"},
        },
    })
    with demo_app_process(app_port, DEMO_SERVICE="web", DEMO_ENV="baseline", DEMO_CALLS="orders",
                          HTTP_PROXY=f"http://127.0.0.1:{web_out}", NO_PROXY="localhost,127.0.0.1"):
        await wait_http(f"http://127.0.0.1:{app_port}/healthz")
        await proxies("sidecar", graph=graph, env="baseline", service="web",
                      app=f"127.0.0.1:{app_port}", listen=f"127.0.0.1:{web_in}",
                      egress=f"127.0.0.1:{web_out}")
        gw = await proxies("gateway", graph=graph)
        url = f"http://127.0.0.1:{port_of(gw, 'gateway')}/cart"
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Host": "web", "baggage": "stax.env=feature-1",
                                           "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
                web_route = r.headers["x-stax-route"]
            async with s.get(url, headers={"Host": "web"}) as r:  # no context: the baseline
                assert r.status == 200
                base_body = await r.json()
    assert web_route.startswith("web=baseline:baseline@v1")
    assert (body["service"], body["instance_env"], body["request_env"]) == (
        "web", "baseline", "feature-1")
    (call,) = body["calls"]
    assert call["status"] == 200 and call["route"] == "orders=ancestor:team-a@v1", call
    seen = orders_a.seen[-1]["headers"]
    assert "stax.env=feature-1" in seen["baggage"] and seen["x-stax-env"] == "feature-1"
    assert seen["traceparent"].split("-")[1] == trace  # the trace continued across the app
    assert int(seen["x-stax-hops"]) >= 3  # gateway, ingress, egress
    (base_call,) = base_body["calls"]
    assert base_call["route"] == "orders=local:baseline@v1" and base_call["body"]["upstream"] == (
        "orders-base")
