"""The sidecar's side of the control plane: the control stream, workload certificates, the local app's health."""
