"""The request path compiled with mypyc: the same Python source, type-checked and turned into a
C extension (as black and mypy ship). Measured on one request (loadtests/icount): 116k → 84k
instructions. Everything else about the package is in pyproject.toml.

No C compiler, or STAX_PURE=1: the package is built without the extension and the sources run
interpreted, as before. At run time, STAX_PURE=1 runs the sources even where it was built."""

import os
import shutil
import sys

from setuptools import setup

# The modules every request passes through. Others (config, admin, runtime, the resolver)
# run a few times per graph change, where compiling buys nothing.
HOT_PATH = [
    "proxy/listener.py", "proxy/server_protocol.py", "proxy/upstream_protocol.py", "proxy/upstream_pool.py",
    "proxy/request.py", "proxy/trailers.py", "proxy/outbox.py", "proxy/deadlines.py",
    "proxy/balancer.py", "proxy/admission.py", "proxy/memo.py", "proxy/errors.py",
    "proxy/stages/forward.py", "proxy/stages/route.py", "proxy/stages/context.py",
    "proxy/stages/path.py", "proxy/stages/sanitize.py", "proxy/stages/policy.py",
    "proxy/stats.py", "proxy/tracing.py",
]


def _extensions() -> list:
    if os.environ.get("STAX_PURE") == "1":
        return []
    if not shutil.which(os.environ.get("CC", "cc")):
        print("stax: no C compiler (cc): the request path runs interpreted", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # silent: modules outside HOT_PATH are read for their types, not checked
    return mypycify(["--follow-imports=silent", "--ignore-missing-imports", "--check-untyped-defs",
                     *HOT_PATH],
                    group_name="proxy._compiled")


setup(ext_modules=_extensions())
