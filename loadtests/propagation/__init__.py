"""Graph propagation through Redis to many proxies: `python -m loadtests.propagation`."""
