# rollout tier (issue 4): blue-green deploys on the local LXD cloud, the NoCloud seed.
# Included by the top Makefile (-include mk/*.mk). RELEASE/ENV may come from the command line.
.PHONY: rollout-deps test-rollout test-rollout-unit demo demo-down release rollout-status \
	bench-deploy

ROLLOUT_ENV ?= dev
# RELEASE comes from mk/image.mk (time + git sha: `make release` makes a new one each time);
# the demo's release is the tree's commit, so a second `make demo` reuses its image.
RELEASE ?= $(shell date -u +r%Y%m%d-%H%M)-$(shell git rev-parse --short=7 HEAD 2>/dev/null || echo nogit)
DEMO_RELEASE ?= g$(shell git rev-parse --short=7 HEAD 2>/dev/null || echo nogit)

TEST_TIERS += tests/e2e

# `cloud-init schema` validates every rendered seed in the unit tests.
rollout-deps:
	@command -v cloud-init >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
	  apt-get install -y -q --no-install-recommends cloud-init; }
test: rollout-deps

test-rollout-unit: venv rollout-deps ## rollout unit tests (planner, retry, seed; no services)
	$(PY) -m pytest tests/unit/rollout

test-rollout: venv rollout-deps ## rollout unit + e2e + fault matrix on real LXD
	$(PY) -m pytest tests/unit/rollout tests/e2e

# Quiet: one line per phase (venv, LXD, base image, wheelhouse, dependencies and release layers,
# then the deploy's own steps); apt, mmdebstrap, pip and Packer output go to the log it names
# (DEMO_LOG=path to choose it), shown when a phase fails. `make local-cloud`/`make image` stay
# verbose. DEMO_BAKE_ARGS: extra packer/bake.py arguments (e.g. --rebuild-deps).
DEMO_LOG ?=
DEMO_BAKE_ARGS ?=
demo: ## local cloud + image (if missing) + deploy, one line per phase; prints the URL
	@MODELSERVE_LXD_PROJECT=$(DEMO_LXD_PROJECT) python3 devtools/demo.py --env $(ROLLOUT_ENV) --release $(DEMO_RELEASE) \
	  --image-env $(IMAGE_ENV) --python $(PY) --venv $(VENV) \
	  $(if $(DEMO_LOG),--log $(DEMO_LOG)) $(foreach a,$(DEMO_BAKE_ARGS),--bake-arg=$(a))

# The demo's targets act on the local LXD cloud and the demo's LXD project, always: never on
# the cloud an OS_CLOUD/OS_AUTH_URL in the shell would choose, nor a project exported for tests.
DEMO_LXD_PROJECT ?= default
DEMO_ROLLOUT := MODELSERVE_LXD_PROJECT=$(DEMO_LXD_PROJECT) $(PY) -m rollout

release: venv ## bake HEAD (git archive; ALLOW_DIRTY=1: the working tree) and deploy it (blue-green)
	$(MAKE) local-cloud
	MODELSERVE_LXD_PROJECT=$(DEMO_LXD_PROJECT) $(MAKE) image CLOUD=lxd RELEASE=$(RELEASE)
	$(DEMO_ROLLOUT) deploy --cloud lxd --env $(ROLLOUT_ENV) --release $(RELEASE)

rollout-status: venv ## live/previous release, instances and images of ROLLOUT_ENV (local LXD)
	$(DEMO_ROLLOUT) status --cloud lxd --env $(ROLLOUT_ENV)

demo-down: venv ## delete the demo env's instances and floating IP (local LXD, whatever OS_CLOUD says)
	$(DEMO_ROLLOUT) destroy --cloud lxd --env $(ROLLOUT_ENV) --yes

bench-deploy: venv ## deploy time, switch time, rollback time, probe failures -> bench/results/
	$(PY) bench/deploy_bench.py
