"""New mTLS connections, one request each, as fast as the server takes them.

Run as `python -m bench.tlschurn --port P --cert CHAIN --key KEY --duration 60`.
`--concurrency` workers each loop: connect, full TLS handshake presenting
the client certificate, one `GET /` (`Connection: close`), read the whole
response, close. No session is ever offered, so every connection is a full
handshake: what a sidecar's inbound pays when callers come and go.

The client does not verify the server's certificate (`CERT_NONE`): it is a
load generator sharing a core with the upstream, and every verification it
skips leaves more of that core for handshakes; the sidecar under test still
verifies the client's certificate, which is the cost being measured.

Prints MEASURE_START and MEASURE_END around the measured part (after
`--warmup`), then one JSON line: connections completed with a 2xx, per
second, failures by kind, and exact percentiles of the time per connection
(connect, handshake, request and response).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import sys
import time

import httptools
import uvloop

from bench.oneshot import OneRequest

MEASURE_START = "MEASURE_START"
MEASURE_END = "MEASURE_END"
_TIMEOUT_S = 10.0  # per connection, handshake included


def client_context(chain: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # see the module docstring
    ctx.load_cert_chain(chain, key)
    return ctx


def failure_kind(exc: BaseException) -> str:
    """A short label for a failed connection, for the JSON's `errors`."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return f"ssl_{exc.reason or 'error'}".lower()
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return type(exc).__name__


class Churn:
    def __init__(self, args: argparse.Namespace, ctx: ssl.SSLContext) -> None:
        self.args = args
        self.ctx = ctx
        self.request = (
            f"GET / HTTP/1.1\r\nHost: {args.host_header}\r\nConnection: close\r\n\r\n".encode()
        )
        self.recording = False
        self.stopping = False
        self.times: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()

    async def one(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                transport, proto = await loop.create_connection(
                    lambda: OneRequest(self.request),
                    self.args.host,
                    self.args.port,
                    ssl=self.ctx,
                    server_hostname="",  # no SNI: the sidecar is reached by address
                )
                status = await proto.answered
        except (OSError, TimeoutError, ssl.SSLError, httptools.HttpParserError) as exc:
            if self.recording:
                self.errors[failure_kind(exc)] += 1
            return
        finally:
            if transport is not None:
                transport.close()
        if not self.recording:
            return
        if 200 <= status < 300:
            self.times.append(time.perf_counter() - started)
        else:
            self.errors[f"status_{status}"] += 1

    async def worker(self) -> None:
        while not self.stopping:
            await self.one()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def summarize(times: list[float], seconds: float, errors: dict[str, int]) -> dict[str, object]:
    values = sorted(times)
    return {
        "connections": len(values),
        "per_s": round(len(values) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(_percentile(values, 50) * 1000, 3),
        "p99_ms": round(_percentile(values, 99) * 1000, 3),
        "max_ms": round(values[-1] * 1000, 3) if values else 0.0,
        "errors": {k: v for k, v in errors.items() if v},
        "failed": sum(errors.values()),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    churn = Churn(args, client_context(args.cert, args.key))
    workers = [asyncio.create_task(churn.worker()) for _ in range(args.concurrency)]
    try:
        if args.warmup > 0:
            await asyncio.sleep(args.warmup)  # the schedule: workers run meanwhile
        print(MEASURE_START, flush=True)
        churn.recording = True
        started = time.perf_counter()
        await asyncio.sleep(args.duration)
        churn.recording = False
        measured = time.perf_counter() - started
        print(MEASURE_END, flush=True)
        churn.stopping = True
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    return summarize(churn.times, measured, churn.errors)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tlschurn", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default="upstream")
    p.add_argument("--cert", required=True, help="client certificate chain (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
