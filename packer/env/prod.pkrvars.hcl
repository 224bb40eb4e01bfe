# prod: an OpenStack project; network ids come from that project. Ubuntu 24.04: the pinned
# numpy/TensorFlow need Python >= 3.11 (22.04 has 3.10).
env_name               = "prod"
os_source_image_name   = "ubuntu-24.04"
os_flavor              = "m1.medium"
os_floating_ip_network = "public"
os_security_groups     = ["modelserve-build"]
os_image_visibility    = "private"
