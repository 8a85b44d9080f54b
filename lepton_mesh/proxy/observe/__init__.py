"""What the sidecar shows: Prometheus metrics, the access log, the admin endpoints."""
