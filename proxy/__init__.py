"""The data plane. Its request path (HOT_PATH in setup.py) is compiled with mypyc when stax is
installed where a C compiler is. STAX_PURE=1 runs the .py sources instead, as Python code:
for pdb, py-spy and icount's bytecode counts, which do not see into compiled frames."""

import os
import sys


def compiled() -> bool:
    """Whether this process runs the compiled request path."""
    from . import server_protocol

    return not server_protocol.__file__.endswith(".py")


if os.environ.get("STAX_PURE") == "1":
    from importlib.machinery import SOURCE_SUFFIXES, FileFinder, SourceFileLoader

    class _Sources:
        """Finds proxy's modules as .py files, ahead of the compiled ones beside them."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if not name.startswith("proxy.") or not path:
                return None
            for entry in path:
                spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
                if spec is not None:
                    return spec
            return None

    sys.meta_path.insert(0, _Sources)
