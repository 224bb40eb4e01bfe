# rollout tier (issue 4): blue-green deploys on the local LXD cloud, the NoCloud seed.
# Included by the top Makefile (-include mk/*.mk). RELEASE/ENV may come from the command line.
.PHONY: rollout-deps test-rollout test-rollout-unit demo release rollout-status bench-deploy

ROLLOUT_ENV ?= dev
# the id of the current tree's release (image tier may define RELEASE first)
RELEASE ?= $(shell git log -1 --date=format:%Y%m%d%H%M --format=r%cd-%h 2>/dev/null || echo r0)

TEST_TIERS += tests/rollout

# `cloud-init schema` validates every rendered seed in the unit tests.
rollout-deps:
	@command -v cloud-init >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
	  apt-get install -y -q --no-install-recommends cloud-init; }
test: rollout-deps

test-rollout-unit: venv rollout-deps ## rollout unit tests (planner, retry, seed; no services)
	$(PY) -m pytest tests/rollout/unit

test-rollout: venv rollout-deps ## rollout unit + e2e + fault matrix on real LXD
	$(PY) -m pytest tests/rollout

demo: venv ## local cloud + image (if missing) + deploy; prints the floating-IP URL
	$(MAKE) local-cloud
	lxc image info modelserve-$(RELEASE) >/dev/null 2>&1 || $(MAKE) image RELEASE=$(RELEASE)
	$(PY) -m rollout deploy --env $(ROLLOUT_ENV) --release $(RELEASE)
	@$(PY) -m rollout status --env $(ROLLOUT_ENV) --json | $(PY) -c \
	  'import json,sys; s=json.load(sys.stdin); print("modelserve", s["live"], "is live at", s["url"])'

release: venv ## bake the current tree (app + model bundle) and deploy it (blue-green)
	$(MAKE) local-cloud
	$(MAKE) image RELEASE=$(RELEASE)
	$(PY) -m rollout deploy --env $(ROLLOUT_ENV) --release $(RELEASE)

rollout-status: venv ## live/previous release, instances and images of ROLLOUT_ENV
	$(PY) -m rollout status --env $(ROLLOUT_ENV)

bench-deploy: venv ## deploy time, switch time, rollback time, probe failures -> bench/results/
	$(PY) bench/deploy_bench.py
