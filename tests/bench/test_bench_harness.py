"""The bench's pure parts: parsing, config rendering, ratios, targets, the registry.

Nothing here times anything: the figures come from `python -m bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import nginx, report, sidecar, wrk
from bench.__main__ import selected
from bench.harness import REGISTRY, RunResult, register
from bench.procs import (
    BenchError,
    CpuSample,
    Pinning,
    cpu_seconds,
    free_ports,
    process_tree,
    rss_mb,
    spawn,
    stop,
)
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping

WRK_STDOUT = (
    "Running 8s test @ http://127.0.0.1:1/\n  1 threads and 50 connections\n"
    + wrk.MARKER
    + json.dumps(
        {
            "requests": 80000,
            "duration_us": 8_000_000,
            "bytes": 1,
            "errors": {"connect": 0, "read": 0, "write": 0, "status": 3, "timeout": 0},
            "latency_us": {
                "p50": 250,
                "p90": 400,
                "p99": 1200,
                "p999": 3000,
                "max": 9000,
                "mean": 260.5,
            },
        }
    )
    + "\n"
)


def test_wrk_result_line_is_read_exactly():
    r = wrk.parse(WRK_STDOUT)
    assert (r.requests, r.rps, r.p50_ms, r.p99_ms, r.p999_ms) == (80000, 10000.0, 0.25, 1.2, 3.0)
    assert r.error_count == 3


def test_wrk_without_result_line_is_an_error():
    with pytest.raises(BenchError, match="no result line"):
        wrk.parse("Running 8s test\n")


@pytest.mark.parametrize(
    ("host", "pin", "expected_tail"),
    [
        (None, [], ["http://127.0.0.1:9/"]),
        ("upstream", ["taskset", "-c", "0"], ["-H", "Host: upstream", "http://127.0.0.1:9/"]),
    ],
)
def test_wrk_command(host, pin, expected_tail):
    argv = wrk.command(
        url="http://127.0.0.1:9/",
        host=host,
        duration_s=8.0,
        connections=50,
        threads=1,
        script=Path("r.lua"),
        pin=pin,
    )
    assert argv[: len(pin)] == pin
    assert argv[len(pin) : len(pin) + 4] == ["wrk", "-t1", "-c50", "-d8s"]
    assert "--latency" in argv
    assert argv[-len(expected_tail) :] == expected_tail


@pytest.mark.parametrize(
    ("render", "must_contain"),
    [
        (lambda p: nginx.upstream_conf(p, 8001), ['return 200 "ok\\n";', "access_log off;"]),
        (
            lambda p: nginx.proxy_conf(p, 8002, 8001),
            [
                "server 127.0.0.1:8001;",
                "keepalive 64;",
                "proxy_http_version 1.1;",
                'proxy_set_header Connection "";',
            ],
        ),
    ],
)
def test_nginx_confs_are_self_contained(tmp_path, render, must_contain):
    conf = render(tmp_path)
    for line in (
        "daemon off;",
        "master_process off;",
        f"pid {tmp_path / 'nginx.pid'};",
        *must_contain,
    ):
        assert line in conf
    # Every path nginx writes is under its own prefix, never the system's.
    for word in conf.split():
        if word.startswith("/") and word != "/":  # `location /` is a URI, not a file
            assert word.rstrip(";").startswith(str(tmp_path)), word


@pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None, reason="no nginx")
@pytest.mark.parametrize("role", ["upstream", "proxy"])
def test_nginx_accepts_the_rendered_confs(tmp_path, role):
    conf = (
        nginx.upstream_conf(tmp_path, 8001)
        if role == "upstream"
        else nginx.proxy_conf(tmp_path, 8002, 8001)
    )
    (tmp_path / "nginx.conf").write_text(conf)
    argv = [nginx.binary(), "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    done = subprocess.run([*argv, "-e", str(tmp_path / "e.log")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sidecar_config_is_what_the_loader_accepts():
    spec = sidecar.SidecarSpec(
        "sidecar-a",
        "bench-client",
        8001,
        {"upstream": [8001]},
        sidecar.SidecarPorts(9001, 9002, 9003),
    )
    cfg = sidecar_config_from_mapping(sidecar.config(spec), "bench")
    assert (cfg.service, str(cfg.app), cfg.access_log.enabled) == (
        "bench-client",
        "127.0.0.1:8001",
        True,
    )
    assert [str(e.address) for e in cfg.services["upstream"].endpoints] == ["127.0.0.1:8001"]
    assert (cfg.listeners.outbound.port, cfg.listeners.inbound.port, cfg.listeners.admin.port) == (
        9001,
        9002,
        9003,
    )


DATA_PLANE_RUNS = ("one_hop", "latency_1000rps", "rss_1000_conns")


def _result(name, kind="throughput", **figures):
    return RunResult(name, kind, **figures)


def test_ratios_only_between_throughput_runs():
    results = {
        "direct": _result("direct", rps=40000.0),
        "one_hop": _result("one_hop", rps=10000.0),
        "nginx": _result("nginx", rps=20000.0),
        "latency_1000rps": _result("latency_1000rps", "latency", rps=1000.0),
    }
    report.ratios(results)
    assert (results["one_hop"].extra["x_direct"], results["one_hop"].extra["x_nginx"]) == (
        0.25,
        0.5,
    )
    assert "x_direct" not in results["latency_1000rps"].extra


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ({}, ["n/a"] * 5),
        (
            {
                "one_hop": _result("one_hop", rps=12000.0, cpu_us_per_req=61.0),
                "nginx": _result("nginx", rps=20000.0),
                "latency_1000rps": _result(
                    "latency_1000rps", "latency", extra={"added_p99_ms_per_hop": 0.4}
                ),
                "rss_1000_conns": _result(
                    "rss_1000_conns", "memory", rss_mb=61.0, extra={"idle_rss_mb": 30.0}
                ),
            },
            ["met", "MISSED", "met", "met", "MISSED"],
        ),
        (
            {
                "one_hop": _result("one_hop", rps=9000.0, extra={"idle_rss_mb": 41.0}),
                "nginx": _result("nginx", rps=20000.0),
            },
            ["MISSED", "n/a", "n/a", "MISSED", "n/a"],
        ),
        (
            {
                "one_hop": _result("one_hop", rps=1.0, error="boom"),
                "nginx": _result("nginx", rps=2.0),
            },
            ["n/a"] * 5,
        ),
    ],
)
def test_targets(results, expected):
    data_plane = [t for t in report.TARGETS if t.run in DATA_PLANE_RUNS]
    assert [t.check(results)[1] for t in data_plane] == expected


def test_table_shows_failures_and_targets():
    results = {
        "direct": _result("direct", rps=40000.0, p50_ms=0.2, p99_ms=0.5),
        "one_hop": _result("one_hop", error="sidecar not ready after 20s\nstderr..."),
    }
    report.ratios(results)
    text = report.table(results)
    assert "FAILED: sidecar not ready after 20s" in text
    assert "stderr..." not in text
    assert "40000" in text


def test_run_json_flattens_extra_and_rounds():
    r = RunResult("one_hop", "throughput", rps=1234.56, p99_ms=1.23456, extra={"idle_rss_mb": 20.0})
    assert r.to_json() == {
        "name": "one_hop",
        "kind": "throughput",
        "rps": 1234.6,
        "p50_ms": None,
        "p99_ms": 1.235,
        "cpu_us_per_req": None,
        "rss_mb": None,
        "idle_rss_mb": 20.0,
    }


def test_registry_order_and_selection():
    assert list(REGISTRY)[:10] == [
        "direct",
        "one_hop",
        "two_hop",
        "two_hop_mtls",  # next to two_hop: the ratio of the two is read from one run
        "nginx",
        "bare_proxy",  # the floor for a Python proxy, beside nginx
        "inbound_plain",
        "inbound_policy",  # next to inbound_plain, for the same reason
        "latency_1000rps",
        "rss_1000_conns",
    ]
    assert selected("nginx,one_hop") == ["one_hop", "nginx"]
    with pytest.raises(BenchError, match="unknown run"):
        selected("one_hop,bogus")
    with pytest.raises(ValueError, match="twice"):
        register("direct")(lambda bench: RunResult("direct", "throughput"))


def test_pinning_prefixes():
    assert Pinning(0, 1).load() == ["taskset", "-c", "0"]
    assert Pinning(0, 1).proxy() == ["taskset", "-c", "1"]
    assert Pinning(None, None).proxy() == []


def test_proc_readings_of_a_spawned_child(tmp_path):
    child = spawn(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdout=tmp_path / "out",
        stderr=tmp_path / "err",
        stdin=subprocess.PIPE,
    )
    try:
        assert child.pid in process_tree(os.getpid())
        assert rss_mb(os.getpid()) > 1
        assert rss_mb(child.pid) >= 0
        assert cpu_seconds(child.pid) >= 0
        assert os.getsid(child.pid) == child.pid  # its own session: Ctrl-C reaches only the bench
    finally:
        assert stop(child) == "stopped"
        child.stdin.close()
    assert child.returncode is not None


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (CpuSample(0.0, 100.0, 10.0), CpuSample(2.0, 102.0, 12.0), 0.0),  # all of it ours
        (CpuSample(0.0, 100.0, 10.0), CpuSample(2.0, 103.0, 12.0), 0.5),  # 1 s of others in 2 s
        (CpuSample(0.0, 100.0, 10.0), CpuSample(2.0, 101.9, 12.0), 0.0),  # tick rounding: never < 0
    ],
)
def test_background_cores(before, after, expected):
    assert before.background_cores(after) == pytest.approx(expected)


def test_noisy_runs_get_a_note():
    results = {
        "direct": _result("direct", extra={"background_cores": 0.05}),
        "one_hop": _result("one_hop", extra={"background_cores": 0.9, "proxy_cores_busy": 0.95}),
        "nginx": _result("nginx", extra={"background_cores": 0.0, "proxy_cores_busy": 0.8}),
    }
    assert report.noise_notes(results) == [
        "note: one_hop ran while other processes used 0.90 cores of the machine",
        "note: nginx's proxy used 0.80 of its core: something else limited its rps"
        " (load core or other work)",
    ]


def test_free_ports_are_distinct():
    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
