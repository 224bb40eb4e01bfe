# prod: an OpenStack project; network ids come from that project. Debian 12 (Python 3.11.2, the
# Python requirements.lock is resolved for: pip installs it with --require-hashes). Another
# base works too (os_source_image_name, os_ssh_username, image_os, image_os_release) but a
# Python other than 3.11.2 installs WITHOUT hash checking (image-scripts/create_venv.sh warns).
env_name               = "prod"
os_source_image_name   = "debian-12"
os_ssh_username        = "debian"
os_flavor              = "m1.medium"
os_floating_ip_network = "public"
os_security_groups     = ["modelserve-build"]
os_image_visibility    = "private"
