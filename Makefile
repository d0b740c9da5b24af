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
TINY_MODEL_ENV := D3_BACKBONE=d3-tiny D3_CLIP_WEIGHTS=random:0 D3_HEAD_WEIGHTS=random:0 \
	AASIST_MODEL=aasist-tiny AASIST_WEIGHTS=random:0 TEXT_SCORING_MODEL=random:0 TEXT_SAMPLING_MODEL=random:1 \
	TEXT_MIN_TOKENS=16 HF_HUB_OFFLINE=1

WEB := web
WEB_SOURCES := $(shell find $(WEB)/src $(WEB)/public -type f 2>/dev/null) $(WEB)/index.html $(WEB)/vite.config.ts \
	$(WEB)/tsconfig.json
HAVE_NODE := $(shell command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && echo yes)
NO_NODE_MESSAGE := Node.js (20.19+) and npm not found: the web front end (/ui) is not built and its tests \
	are skipped. Install Node.js, then run make setup again.

.PHONY: setup tools run demo test lint bench clean web web-test web-client screenshots

setup: $(STAMP) web

# The web front end (web/): npm ci and a Vite build into web/dist, which the app serves at /ui/.
ifeq ($(HAVE_NODE),yes)
web: $(WEB)/dist/index.html
web-test: $(WEB)/node_modules/.installed
	cd $(WEB) && npx vitest run
else
web web-test:
	@echo "make: $(NO_NODE_MESSAGE)" >&2
endif

$(WEB)/node_modules/.installed: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	touch $@

$(WEB)/dist/index.html: $(WEB)/node_modules/.installed $(WEB_SOURCES)
	cd $(WEB) && npm run build

# Regenerate the typed API client from the OpenAPI document the service serves now.
web-client: $(STAMP) $(WEB)/node_modules/.installed
	$(BIN)/python scripts/export_openapi.py $(WEB)/openapi.json
	cd $(WEB) && npm run gen:api

# Pictures of the main views for the README (docs/screenshots/), taken by the end-to-end tests.
screenshots: setup
	UI_SCREENSHOTS=docs/screenshots $(BIN)/pytest tests/test_web_ui.py -q

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The real detector on the embedded defaults (SQLite + local-folder object store). The text LMs
# (tens of GB) are fetched on request only: `d3 fetch-weights --modality text`.
run: setup
	$(BIN)/d3 fetch-weights --if-missing --modality image --modality audio
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
	$(MAKE) --no-print-directory web-test
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/model_throughput.py --tiny
	$(BIN)/python bench/api_load.py --tiny

clean:
	rm -rf $(VENV) .venv-tools .pytest_cache .ruff_cache $(WEB)/node_modules $(WEB)/dist
