"""The eBPF flow source: a TC flow counter (bpf/flow.bpf.c, shipped compiled as flow.bpf.o) loaded
through libbpf with ctypes (libbpf.py), attached and drained by loader.py."""
