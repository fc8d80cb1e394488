"""Monitor service: keeps the fleet view built from instance reports and serves it over gRPC and /metrics."""
