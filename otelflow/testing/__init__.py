"""Test helpers that start real components (kube-apiserver, etcd) on loopback."""
