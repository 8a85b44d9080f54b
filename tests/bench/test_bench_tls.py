"""The mTLS runs' helpers: certificates from the CLI, the churn client, the RSS sampler.

Nothing here times anything: the figures come from `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl

import pytest

from bench import certs, report, sidecar, tlschurn
from bench.harness import RunResult
from bench.procs import RssSampler
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    return certs.issue(tmp_path_factory.mktemp("certs") / "ca", ["bench-client", "upstream"])


def test_certs_from_the_cli_make_a_sidecar_tls_section_the_loader_accepts(mesh):
    for w in mesh.workloads.values():
        assert w.chain.is_file() and w.key.is_file()
    spec = sidecar.SidecarSpec(
        "sidecar-b",
        "upstream",
        8001,
        {},
        sidecar.SidecarPorts(9001, 9002, 9003),
        tls=mesh.sidecar_tls("upstream"),
    )
    cfg = sidecar_config_from_mapping(sidecar.config(spec), "bench")
    assert (cfg.tls.mode, cfg.tls.cert, cfg.tls.bundle) == (
        "STRICT",
        str(mesh.workloads["upstream"].chain),
        str(mesh.bundle),
    )


class _Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(RESPONSE)
            self.transport.close()


async def test_churn_client_makes_new_mtls_connections_with_its_certificate(mesh):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    w = mesh.workloads["upstream"]
    server_ctx.load_cert_chain(w.chain, w.key)
    server_ctx.load_verify_locations(mesh.bundle)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # as a STRICT inbound: no certificate, no entry
    server = await asyncio.get_running_loop().create_server(_Answer, "127.0.0.1", 0, ssl=server_ctx)
    client = mesh.workloads["bench-client"]
    args = argparse.Namespace(
        host="127.0.0.1",
        port=server.sockets[0].getsockname()[1],
        host_header="upstream",
        cert=str(client.chain),
        key=str(client.key),
        concurrency=2,
        duration=0.3,
        warmup=0.0,
    )
    try:
        result = await tlschurn.main_async(args)
    finally:
        server.close()
        await server.wait_closed()
    assert result["connections"] > 0
    assert (result["errors"], result["failed"]) == ({}, 0)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(), "refused"),
        (ConnectionResetError(), "reset"),
        (OSError("x"), "OSError"),
    ],
)
def test_failure_kinds(exc, kind):
    assert tlschurn.failure_kind(exc) == kind


def test_churn_summary():
    s = tlschurn.summarize([0.002, 0.001, 0.004, 0.003], 2.0, {"reset": 1, "timeout": 0})
    assert (s["connections"], s["per_s"], s["p50_ms"], s["max_ms"]) == (4, 2.0, 2.0, 4.0)
    assert (s["errors"], s["failed"]) == ({"reset": 1}, 1)


def test_rss_sampler_reads_at_start_and_stop():
    sampler = RssSampler(os.getpid(), interval_s=60.0).start()
    sampler.stop()
    assert len(sampler.samples) >= 2
    assert sampler.peak() >= sampler.samples[-1][1] > 1
    assert sampler.peak(since_s=1e9) == 0.0


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        (
            {
                "two_hop": RunResult("two_hop", "throughput", rps=10000.0),
                "two_hop_mtls": RunResult("two_hop_mtls", "throughput", rps=7500.0),
                "mtls_churn": RunResult(
                    "mtls_churn",
                    "memory",
                    extra={"rss_after_above_idle_mb": 12.0, "rss_peak_mb": 90.0},
                ),
            },
            ["met", "met", "met"],
        ),
        (
            {
                "two_hop": RunResult("two_hop", "throughput", rps=10000.0),
                "two_hop_mtls": RunResult("two_hop_mtls", "throughput", rps=6000.0),
                "mtls_churn": RunResult(
                    "mtls_churn",
                    "memory",
                    extra={"rss_after_above_idle_mb": 25.0, "rss_peak_mb": 151.0},
                ),
            },
            ["MISSED", "MISSED", "MISSED"],
        ),
        ({"two_hop_mtls": RunResult("two_hop_mtls", "throughput", rps=1.0)}, ["n/a"] * 3),
    ],
)
def test_mtls_targets(results, expected):
    mtls = [t for t in report.TARGETS if t.run in ("two_hop_mtls", "mtls_churn")]
    assert [t.check(results)[1] for t in mtls] == expected


def test_mtls_cpu_ratio_is_added_next_to_the_rps_ratio():
    results = {
        "two_hop": RunResult("two_hop", "throughput", rps=10000.0, cpu_us_per_req=120.0),
        "two_hop_mtls": RunResult("two_hop_mtls", "throughput", rps=6000.0, cpu_us_per_req=150.0),
    }
    report.ratios(results)
    assert results["two_hop_mtls"].extra["cpu_ratio_vs_two_hop"] == 0.8
    assert "cpu_ratio_vs_two_hop" not in results["two_hop"].extra
