# D3 API: `make run` starts the service, `make test` runs the whole test suite. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The quick-start serves loopback only, where running without API keys is allowed, on a port
# browsers open (production's 6000, behind nginx, is one Chrome refuses: ERR_UNSAFE_PORT).
# The terminal shows the app's own JSON line per request; Gunicorn's access log goes to logs/.
QUICKSTART_PORT ?= 8000
QUICKSTART_ENV := BIND=$${BIND:-127.0.0.1:$(QUICKSTART_PORT)} AUTH_REQUIRED=$${AUTH_REQUIRED:-false} \
	GUNICORN_ERROR_LOG=-
TINY_MODEL_ENV := D3_BACKBONE=d3-tiny D3_CLIP_WEIGHTS=random:0 D3_HEAD_WEIGHTS=random:0

.PHONY: setup tools run demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The real detector on the embedded defaults (SQLite + local-folder object store).
run: setup
	$(BIN)/d3 fetch-weights --if-missing
	$(BIN)/d3 db upgrade
	$(QUICKSTART_ENV) $(BIN)/gunicorn -c gunicorn_config.py api.app:app

# The same service on the tiny random model: try the API offline; its verdicts mean nothing.
demo: setup
	$(TINY_MODEL_ENV) $(BIN)/d3 db upgrade
	$(QUICKSTART_ENV) $(TINY_MODEL_ENV) $(BIN)/gunicorn -c gunicorn_config.py api.app:app

# checkov (Kubernetes and Dockerfile checks) in its own venv: its pins would fight the app's.
tools:
	scripts/setup-tools-venv.sh

test: setup tools
	scripts/install-test-deps.sh
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/model_throughput.py --tiny
	$(BIN)/python bench/api_load.py --tiny

clean:
	rm -rf $(VENV) .venv-tools .pytest_cache .ruff_cache
