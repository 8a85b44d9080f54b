"""The demo's two services from an AI customer-service app.

`intent` classifies a customer message; `chat` answers one, asking `intent`
through its own sidecar. Each runs as its own process:

    python -m lepton_mesh.demo.apps intent --port 8001
    python -m lepton_mesh.demo.apps chat --port 8002 --outbound 127.0.0.1:15001

Neither knows where the other runs: `chat` sends every call to its sidecar's
outbound listener with `Host: intent`, and the sidecar routes it. These are
apps, not the proxy, so they are written with aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

# (intent, keywords). First match with the most keyword hits wins; order breaks ties.
INTENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("refund", ("refund", "money back", "return")),
    ("order_status", ("where is", "order", "track", "shipping", "delivery")),
    ("cancel", ("cancel", "unsubscribe", "close my account")),
    ("billing", ("invoice", "charge", "bill", "payment")),
    ("human_agent", ("agent", "human", "person")),
    ("greeting", ("hello", "hi ", "hey")),
)
FALLBACK_INTENT = "other"

REPLIES = {
    "refund": "I can help with that refund. Could you share your order number?",
    "order_status": "Let me look up your order. It should arrive within two days.",
    "cancel": "I'm sorry to see you go. I've started the cancellation for you.",
    "billing": "I've pulled up your latest invoice. Which charge looks wrong?",
    "human_agent": "Connecting you with a person from our support team now.",
    "greeting": "Hello! How can I help you today?",
    "other": "Thanks for your message. Could you tell me a bit more?",
}

PROPAGATED_HEADERS = ("x-request-id", "traceparent", "tracestate")

# Time the intent app spends "thinking" per message, from 1 to 5 ms.
WORK_MS_MIN, WORK_MS_SPAN = 1, 5


def classify(text: str) -> tuple[str, float, int]:
    """(intent, confidence, simulated work in ms): a pure function of `text`."""
    lowered = f" {text.lower()} "
    best, best_hits = FALLBACK_INTENT, 0
    for intent, keywords in INTENTS:
        hits = sum(k in lowered for k in keywords)
        if hits > best_hits:
            best, best_hits = intent, hits
    digest = hashlib.blake2b(text.encode(), digest_size=2).digest()
    jitter = digest[0] / 255 * 0.04
    base = 0.35 if best_hits == 0 else min(0.55 + 0.15 * best_hits, 0.94)
    work_ms = WORK_MS_MIN + digest[1] % WORK_MS_SPAN
    return best, round(base + jitter, 3), work_ms


# -- intent ------------------------------------------------------------------


async def _classify(request: web.Request) -> web.Response:
    try:
        text = str(orjson.loads(await request.read())["text"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _json({"error": 'expected JSON {"text": "..."}'}, status=400)
    intent, confidence, work_ms = classify(text)
    await asyncio.sleep(work_ms / 1000)
    return _json({"intent": intent, "confidence": confidence})


def intent_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", _health("intent"))
    app.router.add_post("/v1/classify", _classify)
    return app


# -- chat --------------------------------------------------------------------

_SESSION = web.AppKey("session", ClientSession)
_OUTBOUND = web.AppKey("outbound", str)


class IntentUnavailable(Exception):
    """The call to `intent` failed; carries what the caller needs to explain it."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


async def _ask_intent(request: web.Request, message: str) -> dict:
    """Classify `message` by calling `intent` through this app's sidecar."""
    app = request.app
    headers = {"Host": "intent", "Content-Type": "application/json"}
    # A mesh can't link an app's inbound and outbound requests by itself: the app
    # must copy these along, as Istio asks its apps to. Then both hops share one id.
    for name in PROPAGATED_HEADERS:
        if value := request.headers.get(name):
            headers[name] = value
    url = f"http://{app[_OUTBOUND]}/v1/classify"
    try:
        async with app[_SESSION].post(
            url, data=orjson.dumps({"text": message}), headers=headers
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                reason = resp.headers.get("x-lepton-reason", "-")
                raise IntentUnavailable(resp.status, reason, body.decode(errors="replace"))
            return orjson.loads(body)
    except (ClientError, TimeoutError) as e:
        raise IntentUnavailable(0, "client_error", repr(e)) from e


async def _chat(request: web.Request) -> web.Response:
    try:
        message = str(orjson.loads(await request.read())["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _json({"error": 'expected JSON {"message": "..."}'}, status=400)
    try:
        result = await _ask_intent(request, message)
    except IntentUnavailable as e:
        return _json(
            {"error": "intent service unavailable", "status": e.status, "reason": e.reason},
            status=502,
        )
    intent = result["intent"]
    return _json(
        {
            "reply": REPLIES.get(intent, REPLIES[FALLBACK_INTENT]),
            "intent": intent,
            "confidence": result["confidence"],
        }
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the reply, one token per event, as an LLM would stream it."""
    message = request.query.get("message", "hello")
    try:
        intent = (await _ask_intent(request, message))["intent"]
    except IntentUnavailable as e:
        return _json({"error": "intent service unavailable", "reason": e.reason}, status=502)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for token in REPLIES.get(intent, REPLIES[FALLBACK_INTENT]).split():
        await resp.write(b"data: " + orjson.dumps({"token": token}) + b"\n\n")
        await asyncio.sleep(0.02)
    await resp.write(b"event: done\ndata: " + orjson.dumps({"intent": intent}) + b"\n\n")
    await resp.write_eof()
    return resp


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=64, keepalive_timeout=30)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=10)) as session:
        app[_SESSION] = session
        yield


def chat_app(outbound: str) -> web.Application:
    app = web.Application()
    app[_OUTBOUND] = outbound
    app.cleanup_ctx.append(_client_session)
    app.router.add_get("/healthz", _health("chat"))
    app.router.add_post("/v1/chat", _chat)
    app.router.add_get("/v1/stream", _stream)
    return app


# -- shared ------------------------------------------------------------------


def _json(payload: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _health(service: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok", "service": service})

    return health


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lepton_mesh.demo.apps")
    parser.add_argument("service", choices=("chat", "intent"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--outbound", help="chat only: its sidecar's outbound host:port")
    args = parser.parse_args(argv)
    if args.service == "chat":
        if not args.outbound:
            parser.error("chat needs --outbound HOST:PORT (its sidecar's outbound listener)")
        app = chat_app(args.outbound)
    else:
        app = intent_app()
    # run_app turns SIGTERM/SIGINT into a graceful stop; 2 s bounds in-flight requests.
    web.run_app(
        app, host=args.host, port=args.port, shutdown_timeout=2.0, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
