# bastion-registry: `make run` serves the registry, `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ROOT   ?= ./data
LISTEN ?= 0.0.0.0:5000
APT_PACKAGES := skopeo podman buildah docker-registry nginx-light wrk
PYTEST_ARGS ?=

.PHONY: run test test-slow test-fast lint bench deps venv clean

$(BIN)/bastion: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $@

venv: $(BIN)/bastion

run: venv
	$(BIN)/bastion serve --root $(ROOT) --listen $(LISTEN)

# Debian packages for the end-to-end tests (real skopeo/podman/buildah, CNCF distribution).
deps:
	@missing=""; for c in skopeo podman buildah docker-registry; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "make deps: not root; install these yourself: $(APT_PACKAGES)"; \
	  fi; \
	fi

test: deps venv
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/pytest -m "not slow and not e2e" $(PYTEST_ARGS)

# pytest exits 5 when nothing is marked slow yet: say so instead of failing
test-slow: deps venv
	$(BIN)/pytest -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests are marked slow"; else exit $$rc; fi

lint: venv
	$(BIN)/ruff check storage server tests bench
	$(BIN)/mypy

bench: deps venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
