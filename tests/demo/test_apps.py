"""The demo apps: intent's classifier is a pure function of the text."""

import pytest

from lepton_mesh.demo.apps import REPLIES, classify

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
