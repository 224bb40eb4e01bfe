# Read only by packer >= 1.7 (`packer init packer/plugins`): Debian's packer 1.6.6 has the lxd
# and openstack builders built in and rejects this block, so it lives outside packer/.
packer {
  required_version = ">= 1.6.6"
  required_plugins {
    lxd = {
      source  = "github.com/hashicorp/lxd"
      version = "~> 1.0"
    }
    openstack = {
      source  = "github.com/hashicorp/openstack"
      version = "~> 1.1"
    }
  }
}
