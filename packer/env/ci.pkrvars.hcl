# ci: the bakes CI runs: on the local LXD cloud, and (CLOUD=openstack) on the OpenStack
# harness's LXD compute host (localcloud/openstack; clouds.yaml cloud modelserve-os-lxd).
env_name = "ci"
# harness: the Debian base it uploads (local-cloud base + openssh-server + cloud-init), its
# flavor for the real image, and the project's web + ssh group. No floating IP: the build
# server's fixed IP is on the harness's bridge (msosbr0), which this host reaches directly.
os_source_image_name = "debian-12-modelserve-base"
os_flavor            = "ms.lxd"
os_security_groups   = ["modelserve"]
