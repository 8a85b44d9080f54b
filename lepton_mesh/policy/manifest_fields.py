"""The envelope every policy manifest shares: `apiVersion`, `kind`, `metadata`, `spec`.

The traffic loader reads the envelope of every kind and hands the
request-security kinds' specs to the security loader; both write the
envelope back when they turn policies into manifests for `/config`. Both
take the version and the shape from here, so neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from lepton_mesh.policy.errors import Path
from lepton_mesh.policy.fields import Checker, check_mapping, parse_name, required, string_map

API_VERSION = "lepton-mesh/v1"
ENVELOPE_FIELDS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_FIELDS = ("name", "namespace", "labels", "annotations")


def parse_metadata(c: Checker, value: Any) -> tuple[str | None, str]:
    """(name, namespace) from `metadata`; the name is None if missing or invalid."""
    path: Path = ("metadata",)
    m = check_mapping(c, value, path, _METADATA_FIELDS)
    if m is None:
        return None, "default"
    name = required(c, m, path, "name", parse_name)
    namespace = parse_name(c, m["namespace"], (*path, "namespace")) if "namespace" in m else None
    # Accepted so manifests kept for Kubernetes tooling load as they are; not used.
    for key in ("labels", "annotations"):
        if key in m:
            string_map(c, m[key], (*path, key), "names to strings", "names")
    return name, namespace or "default"


def envelope(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A manifest of `kind` around `spec`, as the loaders read it back."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
