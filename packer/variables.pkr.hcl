# Packer 1.6.6 (Debian) offers no functions inside validation blocks, so conditions here use
# operators only; formats (release id, sha256, timestamps) are checked by bake.py first.
#
# Inputs of a bake. packer/bake.py (make image) fills the provenance and the inputs directory;
# per-environment values live in env/*.pkrvars.hcl. Credentials never appear here: the
# openstack source reads OS_CLOUD (clouds.yaml) or the OS_* environment variables.

variable "release" {
  type        = string
  description = "Release id: DNS-label safe (a-z, 0-9, '-'), at most 30 characters, e.g. r20261126-0630-7c1bfb0."
  validation {
    condition     = var.release != ""
    error_message = "The release must not be empty (bake.py checks it is DNS-label safe, at most 30 characters)."
  }
}

variable "layer" {
  type        = string
  description = "What this bake adds: full (OS packages, venv, app; OpenStack), deps (OS packages + venv) or release (app on top of a deps image)."
  default     = "full"
  validation {
    condition     = var.layer == "full" || var.layer == "deps" || var.layer == "release"
    error_message = "The layer must be one of: full, deps, release."
  }
}

variable "git_sha" {
  type        = string
  description = "Git commit of the tree being baked (suffix -dirty when it had local changes)."
  validation {
    condition     = var.git_sha != ""
    error_message = "The git_sha must not be empty (a hex commit id, optionally -dirty, or unknown)."
  }
}

variable "app_version" {
  type        = string
  description = "app.__version__ of the baked app."
  default     = "0.0.0"
}

variable "model_sha256" {
  type        = string
  description = "sha256 of app/bundle/model.keras (from the bundle's metadata.json); checked inside the image."
  validation {
    condition     = var.model_sha256 != ""
    error_message = "The model_sha256 must not be empty (64 lowercase hex digits)."
  }
}

variable "model_accuracy" {
  type        = number
  description = "Held-out accuracy of the model bundle (metadata.json metrics.accuracy)."
  validation {
    condition     = var.model_accuracy >= 0 && var.model_accuracy <= 1
    error_message = "The model_accuracy must be a number between 0 and 1."
  }
}

variable "accuracy_floor" {
  type        = number
  default     = 0
  description = "Quality floor of the model bundle (metadata.json accuracy_floor: majority-class baseline + margin); the rollout tool refuses a release below it."
  validation {
    condition     = var.accuracy_floor >= 0 && var.accuracy_floor <= 1
    error_message = "The accuracy_floor must be a number between 0 and 1."
  }
}

variable "provenance" {
  type        = string
  default     = "release"
  description = "What the image was baked from: release (packer/bake.py, a real release) or standin (tests)."
  validation {
    condition     = contains(["release", "standin"], var.provenance)
    error_message = "The provenance must be release or standin."
  }
}

variable "dirty" {
  type        = string
  default     = "false"
  description = "true when the tree was baked as it was (bake.py --allow-dirty), not from git archive of a commit."
  validation {
    condition     = contains(["true", "false"], var.dirty)
    error_message = "The dirty flag must be true or false."
  }
}

variable "security_week" {
  type        = string
  default     = "unknown"
  description = "ISO week (e.g. 2026-W48) whose distribution updates the dependencies layer carries; part of its key."
}

variable "built_at" {
  type        = string
  description = "UTC build time, ISO-8601 (e.g. 2026-11-26T06:30:00Z)."
  validation {
    condition     = var.built_at != ""
    error_message = "The built_at must not be empty (UTC ISO-8601, e.g. 2026-11-26T06:30:00Z)."
  }
}

variable "env_name" {
  type        = string
  description = "Environment this bake is for (dev, ci, prod...), recorded in the manifest."
  default     = "dev"
}

variable "inputs_tarball" {
  type        = string
  description = "Tarball prepared by bake.py: inputs/ (requirements.txt, constraints.txt, requirements.lock, app.tar, extra-ca.pem) and scripts/ (image-scripts)."
}

variable "manifest_path" {
  type        = string
  description = "Where the manifest post-processor records the artifact."
  default     = "manifest.json"
}

variable "image_os" {
  type        = string
  description = "Distribution of the base image, recorded in the image properties (os)."
  default     = "debian"
}

variable "image_os_release" {
  type        = string
  description = "Release of the base image's distribution, recorded in the image properties (release)."
  default     = "bookworm"
}

variable "keep_ssh" {
  type        = bool
  description = "Keep sshd enabled in the final image (off: immutable instances are not logged into)."
  default     = false
}

# --- lxd (local cloud) ---

variable "lxd_source_image" {
  type        = string
  description = "LXD image the bake starts from: the base (deps/full layer) or a deps image (release layer)."
  default     = "modelserve-base-debian12"
}

variable "lxd_output_image" {
  type        = string
  description = "Name of the output image (LXD alias; on OpenStack the Glance image name); empty means modelserve-<release>."
  default     = ""
}

variable "lxd_profile" {
  type        = string
  description = "LXD profile of the build container (bridge NIC, root disk, read-only wheelhouse mount)."
  default     = "modelserve-bake"
}

# --- openstack ---

variable "os_source_image_name" {
  type        = string
  description = "Glance image the bake boots (the newest one with this name): a Debian 12 cloud image (deps/full layer; Python 3.11.2, so the venv installs requirements.lock with --require-hashes), or the deps image modelserve-deps-<key> (release layer; bake.py sets it)."
  default     = "debian-12"
}

variable "os_source_image_visibility" {
  type        = string
  description = "Visibility filter for the base image lookup."
  default     = "public"
  validation {
    condition     = var.os_source_image_visibility == "public" || var.os_source_image_visibility == "private" || var.os_source_image_visibility == "shared" || var.os_source_image_visibility == "community"
    error_message = "The visibility must be public, private, shared or community."
  }
}

variable "os_flavor" {
  type        = string
  description = "Nova flavor of the build server (TensorFlow needs >= 2 GiB RAM and ~6 GiB disk)."
  default     = "m1.small"
}

variable "os_networks" {
  type        = list(string)
  description = "Neutron network ids the build server attaches to."
  default     = []
}

variable "os_floating_ip_network" {
  type        = string
  description = "External network for the build server's floating IP; empty for none (direct reach)."
  default     = ""
}

variable "os_security_groups" {
  type        = list(string)
  description = "Security groups of the build server (must allow SSH from the Packer host)."
  default     = ["default"]
}

variable "os_ssh_username" {
  type        = string
  description = "Login user of the base image (cloud-init's default user; Debian cloud images: debian, Ubuntu: ubuntu). Packer logs in with its temporary keypair."
  default     = "debian"
}

variable "os_ssh_timeout" {
  type        = string
  description = "How long Packer waits for SSH on the build server (boot + cloud-init)."
  default     = "10m"
}

variable "os_image_visibility" {
  type        = string
  description = "Visibility of the baked Glance image."
  default     = "private"
  validation {
    condition     = var.os_image_visibility == "public" || var.os_image_visibility == "private" || var.os_image_visibility == "shared" || var.os_image_visibility == "community"
    error_message = "The visibility must be public, private, shared or community."
  }
}

variable "deps_key" {
  type        = string
  description = "Hash of what the deps layer is made of (requirements, constraints, its scripts, the base image); recorded on deps images."
  default     = ""
}
