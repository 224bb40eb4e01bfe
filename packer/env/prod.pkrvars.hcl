# prod: an OpenStack project; network ids come from that project.
env_name               = "prod"
os_source_image_name   = "ubuntu-22.04"
os_flavor              = "m1.medium"
os_floating_ip_network = "public"
os_security_groups     = ["modelserve-build"]
os_image_visibility    = "private"
