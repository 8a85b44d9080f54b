"""The demo's three services from an AI customer-service app.

`intent` classifies a customer message; `dialog` writes the reply for an
intent (v1, and v2, a new model in canary, whose replies say so); `chat`
answers a customer, asking `intent` and then `dialog` through its own
sidecar. Each instance runs as its own process:

    python -m lepton_mesh.demo.apps intent --port 8001
    python -m lepton_mesh.demo.apps dialog --port 8003 --version v2
    python -m lepton_mesh.demo.apps chat --port 8002 --outbound 127.0.0.1:15001

None knows where the others run: `chat` sends every call to its sidecar's
outbound listener with `Host: intent` or `Host: dialog`, and the sidecar
routes it (which dialog version answers is the Route's choice). These are
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

# dialog v1's replies, by intent.
REPLIES = {
    "refund": "I can help with that refund. Could you share your order number?",
    "order_status": "Let me look up your order. It should arrive within two days.",
    "cancel": "I'm sorry to see you go. I've started the cancellation for you.",
    "billing": "I've pulled up your latest invoice. Which charge looks wrong?",
    "human_agent": "Connecting you with a person from our support team now.",
    "greeting": "Hello! How can I help you today?",
    "other": "Thanks for your message. Could you tell me a bit more?",
}

# v2, the canary model: warmer openings, and it says which version answered.
REPLIES_V2 = {
    "refund": "Happy to sort out that refund! What's your order number?",
    "order_status": "Good news: your order is on its way and should be with you in two days.",
    "cancel": "Understood. Your cancellation is under way; anything we could have done better?",
    "billing": "Let's fix that bill together. Which charge on your latest invoice is off?",
    "human_agent": "Of course! A member of our support team will join this chat shortly.",
    "greeting": "Hi there! What can I do for you today?",
    "other": "Thanks for reaching out! Tell me a little more and I'll get it sorted.",
}
REPLIES_BY_VERSION = {"v1": REPLIES, "v2": REPLIES_V2}

# A mesh can't link an app's inbound and outbound requests by itself: the app
# must copy these along, as Istio asks its apps to. Then every hop shares one
# request id, and the dialog Route can match on the user's group and hash on
# the session.
PROPAGATED_HEADERS = (
    "x-request-id", "traceparent", "tracestate", "x-session-id", "x-user-group",
)  # fmt: skip

# Time the intent and dialog apps spend "thinking" per request, from 1 to 5 ms.
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


# -- dialog ------------------------------------------------------------------

_VERSION = web.AppKey("version", str)


def reply_for(version: str, intent: str) -> str:
    replies = REPLIES_BY_VERSION[version]
    return replies.get(intent, replies[FALLBACK_INTENT])


async def _turn(request: web.Request) -> web.Response:
    try:
        turn = orjson.loads(await request.read())
        intent = str(turn["intent"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _json({"error": 'expected JSON {"intent": "...", "message": "..."}'}, status=400)
    version = request.app[_VERSION]
    await asyncio.sleep((WORK_MS_MIN + len(intent) % WORK_MS_SPAN) / 1000)
    # The Route sets x-canary-split on the calls it splits: echoed, so a curl shows it.
    split = request.headers.get("x-canary-split")
    return _json({"reply": reply_for(version, intent), "version": version, "split": split})


def dialog_app(version: str) -> web.Application:
    if version not in REPLIES_BY_VERSION:
        raise ValueError(f"unknown dialog version {version!r}")
    app = web.Application()
    app[_VERSION] = version
    app.router.add_get("/healthz", _health("dialog", version))
    app.router.add_post("/v1/turn", _turn)
    return app


# -- chat --------------------------------------------------------------------

_SESSION = web.AppKey("session", ClientSession)
_OUTBOUND = web.AppKey("outbound", str)


class UpstreamUnavailable(Exception):
    """A call to another service failed; carries what the caller needs to explain it."""

    def __init__(self, service: str, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.service = service
        self.status = status
        self.reason = reason

    def response(self) -> web.Response:
        return _json(
            {
                "error": f"{self.service} service unavailable",
                "status": self.status,
                "reason": self.reason,
            },
            status=502,
        )


async def _call(request: web.Request, service: str, path: str, payload: dict) -> dict:
    """POST `payload` to `service` through this app's sidecar (outbound listener)."""
    app = request.app
    headers = {"Host": service, "Content-Type": "application/json"}
    for name in PROPAGATED_HEADERS:
        if value := request.headers.get(name):
            headers[name] = value
    url = f"http://{app[_OUTBOUND]}{path}"
    try:
        async with app[_SESSION].post(url, data=orjson.dumps(payload), headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                reason = resp.headers.get("x-lepton-reason", "-")
                raise UpstreamUnavailable(
                    service, resp.status, reason, body.decode(errors="replace")
                )
            return orjson.loads(body)
    except (ClientError, TimeoutError) as e:
        raise UpstreamUnavailable(service, 0, "client_error", repr(e)) from e


async def _answer(request: web.Request, message: str) -> dict:
    """One customer turn: classify the message, then have dialog write the reply."""
    intent = await _call(request, "intent", "/v1/classify", {"text": message})
    turn = await _call(
        request, "dialog", "/v1/turn", {"intent": intent["intent"], "message": message}
    )
    return {
        "reply": turn["reply"],
        "intent": intent["intent"],
        "confidence": intent["confidence"],
        "dialog_version": turn["version"],
    }


async def _chat(request: web.Request) -> web.Response:
    try:
        message = str(orjson.loads(await request.read())["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _json({"error": 'expected JSON {"message": "..."}'}, status=400)
    try:
        return _json(await _answer(request, message))
    except UpstreamUnavailable as e:
        return e.response()


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the reply, one token per event, as an LLM would stream it."""
    message = request.query.get("message", "hello")
    try:
        answer = await _answer(request, message)
    except UpstreamUnavailable as e:
        return e.response()
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for token in answer["reply"].split():
        await resp.write(b"data: " + orjson.dumps({"token": token}) + b"\n\n")
        await asyncio.sleep(0.02)
    done = {"intent": answer["intent"], "dialog_version": answer["dialog_version"]}
    await resp.write(b"event: done\ndata: " + orjson.dumps(done) + b"\n\n")
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


def _health(service: str, version: str = "v1") -> Callable[[web.Request], Awaitable[web.Response]]:
    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok", "service": service, "version": version})

    return health


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lepton_mesh.demo.apps")
    parser.add_argument("service", choices=("chat", "intent", "dialog"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--outbound", help="chat only: its sidecar's outbound host:port")
    parser.add_argument("--version", choices=tuple(REPLIES_BY_VERSION), default="v1",
                        help="dialog only: which model answers")  # fmt: skip
    args = parser.parse_args(argv)
    if args.service == "chat":
        if not args.outbound:
            parser.error("chat needs --outbound HOST:PORT (its sidecar's outbound listener)")
        app = chat_app(args.outbound)
    elif args.service == "dialog":
        app = dialog_app(args.version)
    else:
        app = intent_app()
    # run_app turns SIGTERM/SIGINT into a graceful stop; 2 s bounds in-flight requests.
    try:
        web.run_app(
            app, host=args.host, port=args.port, shutdown_timeout=2.0, print=None, access_log=None
        )
    except OSError as e:  # a port in use: one line for the demo to show, not a traceback
        where = f"{args.host}:{args.port}"
        raise SystemExit(f"{args.service}: cannot listen on {where}: {e.strerror}") from None


if __name__ == "__main__":
    main()
