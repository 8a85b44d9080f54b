"""Resilience mechanisms, each small and testable alone: circuit breaker, retry budget, outlier detection."""
