# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv redis bench clean

$(BIN)/stax: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/stax

venv: $(BIN)/stax

demo: venv
	$(BIN)/stax demo

# redis-server is needed by the integration tests: install it from the OS packages when missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  fi; \
	  command -v redis-server >/dev/null 2>&1 || { echo "redis-server is missing: install it (Debian/Ubuntu: apt-get install redis-server)"; exit 1; }; }

lint: venv
	$(BIN)/ruff check .

test: venv redis
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m loadtests.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
