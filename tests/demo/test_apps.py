"""The demo apps: intent's classifier is a pure function of the text; dialog's
versions differ in what they say and say which they are."""

import pytest
from aiohttp import ClientSession, web

from lepton_mesh.demo.apps import REPLIES, REPLIES_V2, classify, dialog_app, reply_for

CASES = [
    # (text, intent)
    ("Where is my order?", "order_status"),
    ("I want a refund, money back please", "refund"),
    ("Please cancel my subscription", "cancel"),
    ("Why this charge on my invoice?", "billing"),
    ("Can I talk to a human agent?", "human_agent"),
    ("hello", "greeting"),
    ("What's the weather like?", "other"),
    ("", "other"),
]


@pytest.mark.parametrize(("text", "intent"), CASES)
def test_classify(text: str, intent: str) -> None:
    got, confidence, work_ms = classify(text)
    assert got == intent
    assert 0 < confidence < 1
    assert 1 <= work_ms <= 5
    assert got in REPLIES


def test_classify_is_deterministic_and_more_hits_mean_more_confidence() -> None:
    assert classify("refund please") == classify("refund please")
    one = classify("refund")[1]
    two = classify("refund, money back")[1]
    assert two > one


def test_dialog_versions_answer_every_intent_differently() -> None:
    for intent in REPLIES:
        assert reply_for("v1", intent) == REPLIES[intent]
        assert reply_for("v2", intent) == REPLIES_V2[intent] != REPLIES[intent]
    assert reply_for("v2", "no-such-intent") == REPLIES_V2["other"]


def test_dialog_app_refuses_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="unknown dialog version 'v3'"):
        dialog_app("v3")


async def test_dialog_app_says_its_version_and_echoes_the_split() -> None:
    runner = web.AppRunner(dialog_app("v2"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/turn",
                json={"intent": "refund", "message": "money back"},
                headers={"x-canary-split": "90/10"},
            ) as resp:
                assert resp.status == 200
                assert await resp.json() == {
                    "reply": REPLIES_V2["refund"], "version": "v2", "split": "90/10",
                }  # fmt: skip
            async with session.post(f"http://127.0.0.1:{port}/v1/turn", data=b"{}") as resp:
                assert resp.status == 400
    finally:
        await runner.cleanup()
