# ci: the bake that CI runs on the local LXD cloud.
env_name = "ci"
