# modelserve — the targets users and later issues rely on.
# Tiers other than the app's live in mk/*.mk (image, rollout, openstack), included below.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_CACHE ?= /var/cache/modelserve/pip
export PIP_CACHE_DIR := $(PIP_CACHE)

.PHONY: help setup venv run test test-unit test-integration bench bench-variants bench-paths lint train
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: ## idempotent: apt packages, .venv, services the tests need
	devtools/setup.sh

venv: $(VENV)/.installed ## the pinned virtualenv only
$(VENV)/.installed: requirements.txt requirements-rollout.txt requirements-dev.txt constraints.txt
	devtools/setup.sh --venv-only

run: venv ## RabbitMQ + Redis + one worker + waitress on http://127.0.0.1:8080 (Ctrl-C stops them)
	$(PY) -m devtools.run

train: venv ## retrain the committed model bundle (app/bundle)
	$(PY) -m app.train --out app/bundle

lint: venv ## ruff + shellcheck
	$(VENV)/bin/ruff check app rollout devtools tests bench packer localcloud tools
	shellcheck $$(git ls-files '*.sh')

test-unit: venv ## unit tests only (no services)
	$(PY) -m pytest tests/unit

test-integration: setup ## app tests against real RabbitMQ/Redis/workers
	$(PY) -m pytest tests/integration

bench: setup ## modelserve as deployed vs FastAPI/uvicorn and BentoML (BENCH_ARGS=--quick for a smoke check)
	$(PY) bench/peer_bench.py $(BENCH_ARGS)

bench-variants: setup ## serving settings side by side, ratios to the first (BENCH_ARGS='--variant NAME:KEY=VALUE,...')
	$(PY) bench/serve_variants.py $(BENCH_ARGS)

bench-paths: setup ## app paths: broker vs in-process floor vs the seed's path
	$(PY) bench/app_bench.py --out bench/results/paths.json

TEST_TIERS ?= tests/unit tests/integration
# Tiers that run in a lane of their own, beside the others (devtools/test_lanes.py); empty:
# everything in one pytest, one tier after another.
TEST_ALONE ?= tests/openstack
test: setup ## the whole suite, services included (the OpenStack tier beside the others)
	$(PY) -m devtools.test_lanes $(foreach t,$(TEST_ALONE),--alone $(t)) $(TEST_TIERS)

-include mk/*.mk
