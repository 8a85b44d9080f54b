"""lepton-mesh: a service mesh with Python sidecars and an etcd-backed control daemon."""

__version__ = "0.1.0"
