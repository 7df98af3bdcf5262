# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv os-packages bench clean

$(BIN)/stax: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/stax

venv: $(BIN)/stax

demo: venv
	$(BIN)/stax demo

# The integration tests need redis-server, and the soak smoke needs wrk: install what is
# missing from the OS packages.
OS_PKGS := redis-server wrk
os-packages:
	@missing=""; for p in $(OS_PKGS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	  for p in $(OS_PKGS); do command -v $$p >/dev/null 2>&1 || { echo "$$p is missing: install it (Debian/Ubuntu: apt-get install $$p)"; exit 1; }; done; \
	fi

lint: venv
	$(BIN)/ruff check .

test: venv os-packages
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m loadtests.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
