# dev: the local LXD cloud (make image) and a small OpenStack project.
env_name               = "dev"
os_source_image_name   = "ubuntu-24.04"
os_flavor              = "m1.small"
os_floating_ip_network = "public"
os_security_groups     = ["default"]
