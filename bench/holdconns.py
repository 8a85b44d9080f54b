"""Open N keep-alive connections, send one request on each, and hold them open.

Run as `python -m bench.holdconns --port P --host-header upstream --connections 1000`.
Prints one line `READY {json}` once every connection has its answer (or
failed), then holds them all until its stdin closes, then closes them and
exits. The bench reads the proxy's RSS between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httptools
import uvloop

from bench.oneshot import OneRequest

READY = "READY "
_BATCH = 100  # connections opened concurrently: a burst, not a SYN flood


async def _open_one(host: str, port: int, request: bytes) -> tuple[OneRequest | None, str]:
    loop = asyncio.get_running_loop()
    try:
        _, proto = await loop.create_connection(lambda: OneRequest(request), host, port)
        status = await asyncio.wait_for(proto.answered, timeout=10)
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        return None, type(exc).__name__
    return proto, "ok" if 200 <= status < 300 else f"status_{status}"


async def _wait_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def main_async(args: argparse.Namespace) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {args.host_header}\r\n\r\n".encode()
    held: list[OneRequest] = []
    outcomes: dict[str, int] = {}
    for first in range(0, args.connections, _BATCH):
        batch = range(first, min(first + _BATCH, args.connections))
        for proto, outcome in await asyncio.gather(
            *(_open_one(args.host, args.port, request) for _ in batch)
        ):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if proto is not None:
                held.append(proto)
    open_now = sum(1 for p in held if p.transport and not p.transport.is_closing())
    print(READY + json.dumps({"outcomes": outcomes, "open": open_now}), flush=True)
    await _wait_stdin_eof()
    for proto in held:
        if proto.transport is not None:
            proto.transport.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.holdconns", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default="localhost")
    p.add_argument("--connections", type=int, default=1000)
    uvloop.run(main_async(p.parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
