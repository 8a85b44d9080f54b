"""nginx as the bench uses it: the upstream, and the reference reverse proxy.

Each instance gets its own prefix directory holding its config, pid file, logs
and temp paths, and runs in the foreground as one process (`daemon off;
master_process off;`), so stopping it is stopping one PID and nothing of the
system's nginx (its config, logs, service) is read or written. `-e` moves the
error log nginx opens before it reads the config.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, running, spawn, tail, wait_http

_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

# The reference proxy keeps as many idle upstream connections as the sidecar
# plausibly does, and never closes a keep-alive connection by request count
# (nginx's default of 1000 would make wrk reconnect during the run).
_KEEPALIVE_REQUESTS = 1_000_000


def _common(prefix: Path) -> str:
    temps = "\n".join(f"  {name}_temp_path {prefix / name};" for name in _TEMP_DIRS)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
worker_rlimit_nofile 16384;
events {{
  worker_connections 8192;
}}
http {{
{temps}
  default_type text/plain;
  keepalive_requests {_KEEPALIVE_REQUESTS};
"""


def upstream_conf(prefix: Path, port: int) -> str:
    """A fast upstream: a fixed small body straight from memory, no log."""
    return (
        _common(prefix)
        + f"""\
  access_log off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      return 200 "ok\\n";
    }}
  }}
}}
"""
    )


def proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """The reference proxy, configured as one would in production (access log on)."""
    return (
        _common(prefix)
        + f"""\
  access_log {prefix / "access.log"};
  upstream backend {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
    keepalive_requests {_KEEPALIVE_REQUESTS};
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    )


def binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        raise BenchError("nginx not found")
    return found


@dataclass(frozen=True, slots=True)
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def serve(
    label: str, prefix: Path, conf: str, port: int, pin: Sequence[str], deadline_s: float
) -> Iterator[Nginx]:
    """Start nginx with `conf` under `prefix`, wait until it answers, stop it on exit."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in _TEMP_DIRS:
        (prefix / name).mkdir(exist_ok=True)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [
        *pin,
        binary(),
        "-p",
        str(prefix),
        "-c",
        str(conf_path),
        "-e",
        str(prefix / "error.log"),
    ]
    proc = spawn(argv, stdout=prefix / "stdout.log", stderr=prefix / "stderr.log")
    # SIGQUIT is nginx's graceful stop; SIGTERM would drop in-flight requests.
    with running(proc, label, signal.SIGQUIT):
        try:
            wait_http(proc, port, "/", want=200, deadline_s=deadline_s, what=label)
        except BenchError as exc:
            detail = tail(prefix / "error.log") or tail(prefix / "stderr.log")
            raise BenchError(f"{exc}\n{detail}") from exc
        yield Nginx(proc, port, prefix)
