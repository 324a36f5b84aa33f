# The README's commands. `make run` and `make test` set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements-dev.lock pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := .bench-venv/.installed-$(shell cksum < loadtest/bench/requirements.txt | cut -d' ' -f1)

# Debian's redis-server 7.0 (built with TLS), unpacked here by tests/fetch_debian_redis.sh: the
# oldest server we support, in the matrix, and the server of the Redis TLS tests.
DEBIAN_REDIS := $(CURDIR)/.redis-debian/redis-server

.PHONY: run test test-matrix audit lint typecheck docs bench bench-drain lock clean

$(STAMP): requirements-dev.lock pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

## run: Redis (unless REDIS_URL is set), the web service on $$WEB_HOST:$$PORT (127.0.0.1:8000)
## and the consumers.
run: $(STAMP)
	$(BIN)/python -m devtools.devserver

## test: lint, type-check, then the whole suite against the embedded server (Valkey 9), which
## the suite starts itself; the Redis TLS tests run on Debian's redis-server.
test: lint typecheck $(DEBIAN_REDIS)
	REDIS_TLS_SERVER=$(DEBIAN_REDIS) $(BIN)/python -m pytest

## test-matrix: the whole suite again on every other server we support: Debian's Redis 7.0.
test-matrix: $(STAMP) $(DEBIAN_REDIS)
	REDIS_SERVER=$(DEBIAN_REDIS) REDIS_TLS_SERVER=$(DEBIAN_REDIS) $(BIN)/python -m pytest

$(DEBIAN_REDIS):
	sh tests/fetch_debian_redis.sh .redis-debian

## audit: pip-audit over the lock files; fails on a known vulnerability, and lists what it
## could not audit (AUDIT_STRICT=1: fail on those too).
audit: $(STAMP)
	$(BIN)/python .ci/audit.py requirements.lock requirements-uvicorn.lock requirements-tracing.lock requirements-dev.lock

lint: $(STAMP)
	$(BIN)/ruff check pipeline service consumers reactions loadtest devtools tests
	$(BIN)/ruff format --check pipeline service consumers reactions loadtest devtools tests

## docs: regenerate .env.example from the declarations (pipeline/settings.py, the reactions'
## settings), then build the docs site into site/ strictly (its generated tables are filled
## at build time); CI fails on a stale .env.example or a page that does not build.
docs: $(STAMP)
	$(BIN)/python -m devtools.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: per core, each server pinned alone on a core: signup req/s, latency and CPU per
## request (wrk) of this service vs the bare stack and the Flask peer, and consumer jobs/s vs a
## BRPOP loop, arq and SAQ; one table, also written to bench-results.md/.json.
bench: $(STAMP) $(BENCH_STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# The benchmark-only venv: the peers (arq needs redis-py < 6, unlike the application).
$(BENCH_STAMP): loadtest/bench/requirements.txt
	rm -f .bench-venv/.installed-*
	$(PYTHON) -m venv .bench-venv
	.bench-venv/bin/pip install --quiet --disable-pip-version-check -r loadtest/bench/requirements.txt
	touch $@

## bench-drain: jobs/s of one consumer process in each delivery mode (median of 3 rounds).
bench-drain: $(STAMP)
	$(BIN)/python -m loadtest.drain

## lock: re-pin requirements.lock, requirements-uvicorn.lock, requirements-tracing.lock and requirements-dev.lock from
## pyproject.toml.
lock:
	$(PYTHON) -m venv .lockenv && .lockenv/bin/pip install --quiet pip-tools
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	# The uvicorn and tracing locks start from the base lock's pins, so each differs only by its extra's.
	cp requirements.lock requirements-uvicorn.lock
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --extra uvicorn --output-file requirements-uvicorn.lock pyproject.toml
	cp requirements.lock requirements-tracing.lock
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --extra tracing --output-file requirements-tracing.lock pyproject.toml
	.lockenv/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --extra dev --output-file requirements-dev.lock pyproject.toml
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .bench-venv .redis-debian .run .pytest_cache .mypy_cache .ruff_cache site bench-results.md bench-results.json
