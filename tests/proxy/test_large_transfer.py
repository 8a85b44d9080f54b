"""300 MB up and 300 MB down through a sidecar process, with the receiving side
stalling now and then: the sidecar's memory must stay bounded (backpressure
end to end, no whole-message buffering).

The sidecar runs as `python -m lepton_mesh sidecar --config FILE` so its RSS
is its own; the client and the upstream are plain blocking sockets in threads,
cheap enough to leave the CPU to the proxy.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_harness import LOCAL, free_port, repo_root

from lepton_mesh.control.etcd_local import die_with_parent_prefix

TOTAL = 300 * (1 << 20)
BLOCK = 1 << 20
STALL_EVERY = 60 * (1 << 20)  # the slow side stops reading this often ...
STALL = 0.3  # ... for this long: a proxy without backpressure would buffer ~all of it
RSS_BUDGET = 20 * (1 << 20)

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.01):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_bytes(self.pid))


def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, bytes already read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed while reading a head: {buf[:200]!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def drain_slowly(sock: socket.socket, n: int) -> int:
    """Read exactly n bytes, stalling every STALL_EVERY bytes. Returns bytes read."""
    view = memoryview(bytearray(BLOCK))
    got = 0
    next_stall = STALL_EVERY // 6  # stall early too, while everything is warm
    while got < n:
        k = sock.recv_into(view, min(BLOCK, n - got))
        if not k:
            break
        got += k
        if got >= next_stall:
            time.sleep(STALL)  # the slow reader's pacing, not a wait for state
            next_stall += STALL_EVERY
    return got


def send_all(sock: socket.socket, n: int) -> None:
    block = b"\xab" * BLOCK
    left = n
    while left:
        k = min(left, BLOCK)
        sock.sendall(block[:k])
        left -= k


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


class Upstream(threading.Thread):
    """POST: reads the body slowly and answers with the count. GET /N: sends N bytes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server((LOCAL, 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.received: list[int] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    try:
                        head, rest = recv_head(conn)
                    except AssertionError:
                        return
                    method, target = head.split(b" ")[:2]
                    if method == b"POST":
                        n = content_length(head)
                        got = len(rest) + drain_slowly(conn, n - len(rest))
                        self.received.append(got)
                        body = str(got).encode()
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                        )
                    else:
                        n = int(target.rsplit(b"/", 1)[1])
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                        send_all(conn, n)
            except OSError as e:
                self.errors.append(e)

    def close(self) -> None:
        self.listener.close()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, (
            f"sidecar exited: {proc.stderr.read().decode() if proc.stderr else ''}"
        )
        with socket.socket() as s:
            if s.connect_ex((LOCAL, port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError("sidecar did not start listening")


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[tuple[int, int, Upstream]]:
    up = Upstream()
    up.start()
    outbound = free_port()
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"""\
service: big
app: 127.0.0.1:{up.port}
listeners:
  outbound: 127.0.0.1:{outbound}
  inbound: 127.0.0.1:{free_port()}
  admin: 127.0.0.1:{free_port()}
access_log: false
timeouts:
  request: 0
services:
  bulk:
    endpoints: ["127.0.0.1:{up.port}"]
"""
    )
    proc = subprocess.Popen(
        [
            *die_with_parent_prefix(),
            sys.executable,
            "-m",
            "lepton_mesh",
            "sidecar",
            "--config",
            str(cfg),
        ],
        cwd=repo_root(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(outbound, proc)
        yield proc.pid, outbound, up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # drain without the outbound grace SIGTERM gives
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        up.close()


def upload(port: int, n: int) -> int:
    with socket.create_connection((LOCAL, port)) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: bulk\r\nContent-Length: %d\r\n\r\n" % n)
        send_all(s, n)
        head, rest = recv_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        while len(rest) < content_length(head):
            rest += s.recv(100)
        return int(rest)


def download(port: int, n: int) -> int:
    with socket.create_connection((LOCAL, port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        s.sendall(b"GET /down/%d HTTP/1.1\r\nHost: bulk\r\n\r\n" % n)
        head, rest = recv_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert content_length(head) == n
        return len(rest) + drain_slowly(s, n - len(rest))


def test_300mb_up_and_down_with_slow_reader_keeps_rss_bounded(sidecar_process) -> None:
    pid, port, up = sidecar_process
    # Warm up every code path once so that imports and first-use allocations
    # are in the baseline, not in the measurement.
    assert upload(port, 4 * BLOCK) == 4 * BLOCK
    assert download(port, 4 * BLOCK) == 4 * BLOCK
    baseline = rss_bytes(pid)
    sampler = RssSampler(pid)
    sampler.start()
    t0 = time.monotonic()
    try:
        assert upload(port, TOTAL) == TOTAL
        assert download(port, TOTAL) == TOTAL
    finally:
        sampler.stop_event.set()
        sampler.join()
    elapsed = time.monotonic() - t0
    growth = sampler.peak - baseline
    print(
        f"600 MB through the sidecar in {elapsed:.1f}s; RSS baseline {baseline >> 20} MiB, peak growth {growth / (1 << 20):.1f} MiB"
    )
    assert growth < RSS_BUDGET, (
        f"sidecar RSS grew by {growth / (1 << 20):.1f} MiB (budget {RSS_BUDGET >> 20} MiB)"
    )
    assert not up.errors, up.errors
    assert up.received[-1] == TOTAL
