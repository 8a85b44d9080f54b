"""Outbound choices: the logical layer (service and rule), the concrete layer (backends and their state), balancers, endpoint state, connection pools."""
