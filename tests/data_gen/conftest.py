"""Fixtures for data_gen tests."""

import pytest

from .assets import row


@pytest.fixture
def llava_rows():
    """One row per outcome; the loopback teacher obeys the #fault / #judge directives in the questions."""
    return [
        row("ok", "<image>\nWhat color is it?", "red", hints=["The object is red."]),
        row("multi", "How many? <image>", "3") | {"conversations": [
            {"from": "human", "value": "How many? <image>"}, {"from": "gpt", "value": "3"},
            {"from": "human", "value": "And the squares?"}, {"from": "gpt", "value": "4"}]},
        row("flaky500", "Q #fault=500*2", "yes", image="imgs/1.jpg"),
        row("ratelimited", "Q #fault=429*2", "5", image="imgs/2.jpg"),
        row("slow", "Q #fault=slow*1", "5", image="imgs/2.jpg"),
        row("malformed", "Q #fault=malformed*1", "5", image="imgs/3.jpg"),
        row("disconnect", "Q #fault=disconnect*1", "5", image="imgs/3.jpg"),
        row("empty_then_ok", "Q #fault=empty*1", "B", image="imgs/4.jpg"),
        row("refuses", "Q #fault=refusal", "yes", image="imgs/4.jpg"),
        row("wrong", "Q #fault=wrong_answer", "B", image="imgs/5.jpg"),
        row("broken", "Q #fault=broken_tags", "B", image="imgs/5.jpg"),
        row("judged_yes", "Q #fault=wrong_answer #judge=yes", "5", image="imgs/6.jpg"),
        row("missing_image", "Q", "B", image="imgs/nope.jpg"),
        row("corrupt_image", "Q", "B", image="imgs/corrupt.jpg"),
        row("bad_roles", "Q", "B") | {"conversations": [{"from": "gpt", "value": "Q"}, {"from": "human", "value": "B"}]},
        row("no_answer", "Q", "  "),
        row("no_placeholder", "What is shown?", "a cat", image="imgs/7.jpg"),
    ]

