"""The control daemon (etcd-backed registry, policy store, CA, config push); see docs/."""
