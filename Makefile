# The README's commands. `make run` and `make test` set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements-dev.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint typecheck bench-drain lock clean

$(STAMP): requirements-dev.lock pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

## run: Redis (unless REDIS_URL is set), the web service on $$PORT (8000) and the consumers.
run: $(STAMP)
	$(BIN)/python -m pipeline.devserver

## test: lint, type-check, then the whole suite against a redis-server the suite starts itself.
test: lint typecheck
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline service consumers loadtest tests
	$(BIN)/ruff format --check pipeline service consumers loadtest tests

typecheck: $(STAMP)
	$(BIN)/mypy

## bench-drain: jobs/s of one consumer process in each delivery mode (median of 3 rounds).
bench-drain: $(STAMP)
	$(BIN)/python -m loadtest.drain

## lock: re-pin requirements.lock and requirements-dev.lock from pyproject.toml.
lock:
	$(PYTHON) -m venv .lockenv && .lockenv/bin/pip install --quiet pip-tools
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --extra dev --output-file requirements-dev.lock pyproject.toml
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
