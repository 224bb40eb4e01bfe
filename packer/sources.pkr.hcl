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
  image_name = local.image_name
  source_image_filter {
    filters {
      name       = var.os_source_image_name
      visibility = var.os_source_image_visibility
    }
    most_recent = true
  }
  flavor              = var.os_flavor
  networks            = var.os_networks
  floating_ip_network = var.os_floating_ip_network
  security_groups     = var.os_security_groups
  # Packer's temporary keypair goes in through Nova (cloud-init puts it in the default user's
  # authorized_keys); the build server is reached on its floating IP, or on its fixed IP
  # when os_floating_ip_network is empty.
  ssh_username     = var.os_ssh_username
  ssh_timeout      = var.os_ssh_timeout
  image_visibility = var.os_image_visibility
  # the same properties as the LXD image: provenance (release layer) or the deps key (deps)
  metadata                = local.lxd_properties
  image_tags              = var.layer == "deps" ? ["modelserve", "deps-${var.deps_key}"] : ["modelserve", "release-${var.release}"]
  use_blockstorage_volume = false
}
