"""OTLP: hand-written protobuf encoding and the gRPC / HTTP exporters (the flow hot path)."""
