"""Load tests: the benchmark (`python -m loadtests.bench`), graph propagation through Redis
(`python -m loadtests.propagation`) and Locust scenarios (`loadtests/locustfile.py`)."""
