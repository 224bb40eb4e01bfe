# openstack tier (issue 5): a real OpenStack control plane on loopback (localcloud/openstack) and
# the tests of the rollout OpenStack provider + Packer's openstack source against it.
# Included by the top Makefile (-include mk/*.mk).
.PHONY: openstack-deps openstack-up openstack-down openstack-status test-openstack bench-openstack

OPENSTACK_APT := python3-venv mariadb-server rabbitmq-server redis-server packer cloud-init openssh-client iproute2

# Debian packages the harness runs (its Python services come from requirements-openstack.txt
# in their own venv). Package scripts must not start daemons: the harness starts its own.
openstack-deps:
	@missing=""; for p in $(OPENSTACK_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "openstack-deps: apt-get install$$missing"; \
	  own_policy=0; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1; }; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing >/dev/null; rc=$$?; \
	  [ $$own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

openstack-up: venv openstack-deps ## bring up Keystone/Glance/Placement/Nova/Neutron on loopback; prints clouds.yaml
	$(PY) -m localcloud.openstack up

openstack-down: ## stop exactly what openstack-up started (by PID file)
	$(PY) -m localcloud.openstack down

openstack-status: ## which harness daemons run
	$(PY) -m localcloud.openstack status

test-openstack: venv openstack-deps ## the OpenStack tier alone (brings the control plane up and down itself)
	$(PY) -m pytest tests/openstack

bench-openstack: venv openstack-deps ## bring-up, deploy and rollback times through OpenStack -> bench/results/openstack.json
	$(PY) bench/openstack_bench.py

TEST_TIERS += tests/openstack
test: openstack-deps
