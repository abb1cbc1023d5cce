"""Kubernetes and inventory metadata: slim records, the IP index, the static inventory."""
