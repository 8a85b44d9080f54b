"""Reading the running mesh: the sidecars' metrics and the config they run.

Everything the demo reports or waits for is read from the sidecars' admin
endpoints (`/metrics`, `/config`), never from the demo's own bookkeeping: the
point is to show what the mesh itself says. Waits poll with a deadline; a
deadline passed is a typed error naming what did not happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout

from lepton_mesh.demo.errors import MetricsUnavailable, PropagationTimeout
from lepton_mesh.demo.summary import Scrape, parse_metrics
from lepton_mesh.demo.topology import Mesh, Node

POLL_S = 0.02


class Observer:
    """One HTTP session for every admin read of a demo run. Use as a context manager."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._session: ClientSession | None = None

    async def __aenter__(self) -> Observer:
        self._session = ClientSession(timeout=ClientTimeout(total=5))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, url: str) -> bytes:
        assert self._session is not None, "use Observer as a context manager"
        try:
            async with self._session.get(url) as resp:
                resp.raise_for_status()
                return await resp.read()
        except (ClientError, TimeoutError) as e:
            raise MetricsUnavailable(f"GET {url}: {e!r}") from e

    async def scrape(self, node: Node) -> Scrape:
        return parse_metrics((await self._get(node.url("admin", "/metrics"))).decode())

    async def scrape_all(self) -> dict[str, Scrape]:
        """Every sidecar's metrics, by node name, read concurrently."""
        nodes = self.mesh.nodes
        scrapes = await asyncio.gather(*(self.scrape(n) for n in nodes))
        return {n.name: s for n, s in zip(nodes, scrapes, strict=True)}

    async def running_config(self, node: Node) -> dict[str, Any]:
        """The config `node`'s sidecar runs now (its admin /config), as JSON."""
        return orjson.loads(await self._get(node.url("admin", "/config")))

    async def wait_until(
        self,
        node: Node,
        check: Callable[[dict[str, Any]], bool],
        *,
        timeout: float,
        what: str,
    ) -> float:
        """Poll `node`'s running config until `check` holds; the seconds it took."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            config = await self.running_config(node)
            if check(config):
                return loop.time() - start
            if loop.time() - start > timeout:
                raise PropagationTimeout(
                    f"{node.name}'s sidecar: {what} not seen within {timeout:.0f} s; "
                    f"control_status {config.get('control_status')}"
                )
            await asyncio.sleep(POLL_S)


def healthy_endpoints(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """service -> the `version` labels of its healthy endpoints, from a running config."""
    out: dict[str, list[str]] = {}
    for name, svc in (config.get("services") or {}).items():
        out[name] = sorted(
            str((e.get("labels") or {}).get("version", "?"))
            for e in svc.get("endpoints", [])
            if e.get("healthy", True)
        )
    return out


def route_rule_weights(manifests: Any, destination: str, rule: str) -> dict[str, int] | None:
    """subset -> weight of the named rule of the Route for `destination`, or None.

    Works on policy files as loaded (`yaml.safe_load_all`) and on a running
    config's `policies`, which keep the same shape.
    """
    for doc in manifests or ():
        if not isinstance(doc, dict) or doc.get("kind") != "Route":
            continue
        spec = doc.get("spec") or {}
        if spec.get("destination") != destination:
            continue
        for r in spec.get("rules") or ():
            if r.get("name") == rule:
                return {str(b.get("subset")): int(b.get("weight", 1)) for b in r["backends"]}
    return None
