# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv build os-packages bench clean

$(BIN)/stax: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/stax $(VENV)/.compiled

venv: $(BIN)/stax

# The request path is compiled with mypyc (setup.py's HOT_PATH) into proxy/*.so, which Python
# prefers to the .py beside it: rebuilt here whenever one of those sources changes (~25 s).
HOT_PATH := $(shell grep -o '"proxy/[a-z_/]*\.py"' setup.py | tr -d '"')
COMPILED := $(VENV)/.compiled
$(COMPILED): $(BIN)/stax setup.py $(HOT_PATH)
	$(BIN)/pip install -q --no-deps -e .
	touch $(COMPILED)

build: $(COMPILED)

demo: build
	$(BIN)/stax demo

# The integration tests need redis-server; the soak smoke test also uses wrk, and icount's counts
# valgrind (each skipped or left out, saying so, without it). Install what is missing from the
# OS packages; only redis-server is a must.
OS_PKGS := redis-server wrk valgrind
os-packages:
	@missing=""; for p in $(OS_PKGS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && { [ -z "$$sudo" ] || command -v sudo >/dev/null 2>&1; }; then \
	  $$sudo apt-get update -qq || true; \
	  for p in $$missing; do $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p >/dev/null || true; done; \
	fi; \
	command -v wrk >/dev/null 2>&1 || echo "wrk is missing (apt-get install wrk): the soak smoke test will be skipped"; \
	command -v valgrind >/dev/null 2>&1 || echo "valgrind is missing (apt-get install valgrind): icount's counts are left out"; \
	command -v redis-server >/dev/null 2>&1 || { echo "redis-server is missing: install it (Debian/Ubuntu: apt-get install redis-server)"; exit 1; }

lint: venv
	$(BIN)/ruff check .

test: build os-packages
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python -m loadtests.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build
	find proxy -name '*.so' -delete
