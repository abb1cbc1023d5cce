"""Kubernetes metadata: a light API client (standard library only) and the list+watch cache that
keeps the agent's IP index current. See ``client`` and ``cache``."""
