# One source per cloud; pick one with -only=lxd.modelserve or -only=openstack.modelserve.

source "lxd" "modelserve" {
  image              = var.lxd_source_image
  output_image       = local.image_name
  container_name     = "packer-${local.image_name}"
  profile            = var.lxd_profile
  init_sleep         = "2"
  publish_properties = local.lxd_properties
}

source "openstack" "modelserve" {
  image_name = "modelserve-${var.release}"
  source_image_filter {
    filters {
      name       = var.os_source_image_name
      visibility = var.os_source_image_visibility
    }
    most_recent = true
  }
  flavor                  = var.os_flavor
  networks                = var.os_networks
  floating_ip_network     = var.os_floating_ip_network
  security_groups         = var.os_security_groups
  ssh_username            = var.os_ssh_username
  image_visibility        = var.os_image_visibility
  metadata                = merge(local.provenance, { os = "ubuntu", description = "modelserve ${var.release} (git ${var.git_sha})" })
  image_tags              = ["modelserve", "release-${var.release}"]
  use_blockstorage_volume = false
}
