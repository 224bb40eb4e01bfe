# image tier (issue 3): the local LXD cloud, `make image` (Packer) and its tests.
# Included by the top Makefile (-include mk/*.mk), before rollout.mk, so RELEASE is ours.
.PHONY: local-cloud image test-image bench-bake lint-image lock

CLOUD ?= lxd
IMAGE_ENV ?= dev
# Release id: r<UTC yyyymmdd-HHMM>-<short sha>, DNS-label safe, <= 30 chars; frozen once per run.
RELEASE ?= $(shell date -u +r%Y%m%d-%H%M)-$(shell git rev-parse --short=7 HEAD 2>/dev/null || echo nogit)
RELEASE := $(RELEASE)

TEST_TIERS += tests/image
# LXD up before the lanes start: the image, e2e and OpenStack tiers all use it, side by side
test: local-cloud

local-cloud: ## LXD daemon, storage pool, msbr0 NAT bridge, Debian 12 base image (idempotent)
	localcloud/lxd/up.sh

image: $(if $(filter openstack,$(CLOUD)),venv) ## bake modelserve-$(RELEASE) from git archive of HEAD (CLOUD=lxd|openstack, RELEASE=..., IMAGE_ENV=dev, ALLOW_DIRTY=1)
	$(if $(filter openstack,$(CLOUD)),$(PY),python3) packer/bake.py --cloud $(CLOUD) --release $(RELEASE) --env $(IMAGE_ENV) $(if $(ALLOW_DIRTY),--allow-dirty)

lock: ## regenerate requirements.lock (hashes of the image's wheels) after changing requirements.txt/constraints.txt
	python3 tools/lock_requirements.py

lint-image: ## packer fmt/validate (syntax) and shellcheck of the image scripts
	cd packer && packer fmt -check . && packer fmt -check plugins
	shellcheck -x image-scripts/*.sh image-scripts/files/modelserve-firstboot \
	  image-scripts/files/modelserve-role-is localcloud/lxd/*.sh

test-image: venv ## image tier alone: static checks, a real bake, boot, hygiene, failure path
	$(PY) -m pytest tests/image

bench-bake: venv ## full vs incremental bake time and image sizes (bench/results/bake.json)
	$(PY) bench/bake_bench.py
