"""Ports for the listeners and processes a test starts.

`free_port` is the local etcd's (lepton_mesh.control.etcd_local): a port below
the kernel's ephemeral range, never handed out twice in one process. A port
from bind(0) has neither property: two calls in a row can return the same
one (seen: a test's app port equal to its admin port), and as an ephemeral
port it can become an outgoing connection's local port before the process
under test binds it.
"""

from __future__ import annotations

from lepton_mesh.control.etcd_local import free_port

__all__ = ["free_port"]
