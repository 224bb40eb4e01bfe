# The bake: inputs in, then one script per phase in this order (bento style: the order lives
# here, not in the file names), then a manifest recording the artifact.

build {
  sources = ["source.lxd.modelserve", "source.openstack.modelserve"]

  # One tarball (inputs/ + scripts/): a single file uploads the same way over lxc and SSH.
  provisioner "file" {
    source      = var.inputs_tarball
    destination = "/tmp/modelserve-build.tar"
  }

  provisioner "shell" {
    inline = [
      "rm -rf /tmp/modelserve-build && mkdir -m 0700 /tmp/modelserve-build",
      "tar -C /tmp/modelserve-build --no-same-owner -xf /tmp/modelserve-build.tar",
      "rm -f /tmp/modelserve-build.tar",
    ]
  }

  # The phases, in order. Each runs under its own name (so a failure names script and line).
  provisioner "shell" {
    environment_vars = local.env_vars
    execute_command  = "chmod +x {{ .Path }}; sudo -E env {{ .Vars }} bash {{ .Path }}"
    inline = [
      "set -e",
      "bash /tmp/modelserve-build/scripts/trust_build_ca.sh",
      "bash /tmp/modelserve-build/scripts/upgrade_os.sh",
      "bash /tmp/modelserve-build/scripts/install_rabbitmq.sh",
      "bash /tmp/modelserve-build/scripts/create_venv.sh",
      "bash /tmp/modelserve-build/scripts/install_app.sh",
      "bash /tmp/modelserve-build/scripts/install_units.sh",
      "bash /tmp/modelserve-build/scripts/harden.sh",
      "bash /tmp/modelserve-build/scripts/cleanup.sh",
    ]
  }

  post-processor "manifest" {
    output     = var.manifest_path
    strip_path = true
    custom_data = merge(local.provenance, {
      layer = var.layer
      env   = var.env_name
      image = local.image_name
    })
  }
}
