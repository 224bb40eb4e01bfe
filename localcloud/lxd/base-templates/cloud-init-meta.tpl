instance-id: {{ container.name }}
local-hostname: {{ container.name }}
