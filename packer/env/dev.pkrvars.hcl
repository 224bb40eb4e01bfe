# dev: the local LXD cloud (make image) and a small OpenStack project. The OpenStack base is a
# Debian 12 cloud image (Python 3.11.2: the venv installs requirements.lock with hashes).
env_name               = "dev"
os_source_image_name   = "debian-12"
os_ssh_username        = "debian"
os_flavor              = "m1.small"
os_floating_ip_network = "public"
os_security_groups     = ["default"]
