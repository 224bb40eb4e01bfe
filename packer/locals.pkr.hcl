locals {
  image_name = var.lxd_output_image != "" ? var.lxd_output_image : "modelserve-${var.release}"
  # Provenance: LXD image properties and Glance image properties carry exactly these keys; the
  # rollout tool finds release images by them.
  provenance = {
    modelserve_release        = var.release
    modelserve_git_sha        = var.git_sha
    modelserve_app_version    = var.app_version
    modelserve_model_sha256   = var.model_sha256
    modelserve_model_accuracy = "${var.model_accuracy}"
    modelserve_accuracy_floor = "${var.accuracy_floor}"
    modelserve_provenance     = var.provenance
    modelserve_built_at       = var.built_at
    modelserve_dirty          = var.dirty
    modelserve_security_week  = var.security_week
  }
  # A deps image is no release: it carries its key, never modelserve_release, so the rollout tool
  # cannot mistake it for one.
  lxd_properties = var.layer == "deps" ? {
    modelserve_deps_key      = var.deps_key
    modelserve_security_week = var.security_week
    os                       = var.image_os
    release                  = var.image_os_release
    description              = "modelserve dependencies layer ${var.deps_key} (OS packages + venv)"
    } : merge(local.provenance, {
      os          = var.image_os
      release     = var.image_os_release
      description = "modelserve ${var.release} (git ${var.git_sha}, model ${substr(var.model_sha256, 0, 12)})"
  })
  env_vars = [
    "MODELSERVE_LAYER=${var.layer}",
    "MODELSERVE_BUILD_DIR=/tmp/modelserve-build",
    "MODELSERVE_RELEASE=${var.release}",
    "MODELSERVE_GIT_SHA=${var.git_sha}",
    "MODELSERVE_APP_VERSION=${var.app_version}",
    "MODELSERVE_MODEL_SHA256=${var.model_sha256}",
    "MODELSERVE_MODEL_ACCURACY=${var.model_accuracy}",
    "MODELSERVE_ACCURACY_FLOOR=${var.accuracy_floor}",
    "MODELSERVE_PROVENANCE=${var.provenance}",
    "MODELSERVE_BUILT_AT=${var.built_at}",
    "MODELSERVE_DIRTY=${var.dirty}",
    "MODELSERVE_SECURITY_WEEK=${var.security_week}",
    "MODELSERVE_KEEP_SSH=${var.keep_ssh}",
  ]
}
