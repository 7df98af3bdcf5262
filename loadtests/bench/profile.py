"""`--profile`: sample a stax process with py-spy while wrk loads it, keep the raw stacks and a
flame graph in loadtests/results/, and summarize self and inclusive time per function."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from .load import LoadSpec, run_load
from .targets import Target


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def record(pid: int, out: Path, duration: int, *, fmt: str = "raw", rate: int = 250) -> subprocess.Popen:
    return subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(duration),
                             "--rate", str(rate), "--nonblocking", "--format", fmt, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarize(raw: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_t: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    share = lambda c: [(f, round(100 * n / total, 1)) for f, n in c.most_common(top)]  # noqa: E731
    ours = Counter({f: n for f, n in incl.items() if "(proxy/" in f or "(resolver/" in f})
    return {"samples": total, "self": share(self_t), "inclusive_proxy": share(ours)}


def profile_under_load(t: Target, *, tmp: Path, duration: int, out_dir: Path,
                       python_load: bool, connections: int = 64) -> dict:
    if py_spy() is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw, svg = out_dir / f"profile-{t.name}-{stamp}.txt", out_dir / f"profile-{t.name}-{stamp}.svg"
    spec = LoadSpec(t.port, "/small")
    result: dict = {}

    def load() -> None:
        result.update(run_load(spec, connections=connections, duration=duration + 1, pids=t.pids(),
                               tmp=tmp, python_load=python_load))

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.5)
    spies = [record(t.proc.pid, raw, duration), record(t.proc.pid, svg, duration, fmt="flamegraph", rate=100)]
    errors = [s.communicate()[1] for s in spies]
    loader.join()
    if not raw.exists():
        return {"error": f"py-spy failed: {errors[0].strip()[-300:]}"}
    return {"raw": str(raw), "flamegraph": str(svg), "rps_while_sampled": result.get("rps"),
            **summarize(raw)}


def report(name: str, p: dict) -> str:
    if "error" in p:
        return f"profile {name}: {p['error']}"
    out = [f"profile {name}: {p['samples']} samples at {p['rps_while_sampled'] or 0:,.0f} req/s "
           f"(py-spy, nonblocking; flame graph {p['flamegraph']})",
           "  self time (where the interpreter was):"]
    out += [f"    {pct:5.1f}%  {f}" for f, pct in p["self"]]
    out.append("  inclusive time, proxy/ and resolver/ functions:")
    out += [f"    {pct:5.1f}%  {f}" for f, pct in p["inclusive_proxy"]]
    return "\n".join(out)
