"""researchlab.llm.tokenizers and .chat without downloads: byte-level BPE round trips (property test), every
shipped template prefix-preserving with a loss mask that is exactly the assistant's text on hand-written
conversations, the segment tokenization check, bad inputs named; and the SmolLM2 GGUF tokenizer (marked
`llm`) on the same conversations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from researchlab.llm.chat import (
    CHATML_TEMPLATE,
    HERMES_TEMPLATE,
    apply_chat_template,
    check_prefix_preserving,
    parse_tool_calls,
    render_chat,
    render_segments,
)
from researchlab.llm.tokenizers import Tokenizer, load_tokenizer, smollm2_path, train_bpe
from researchlab.llm.types import Conversation, Message, ToolCall

CORPUS = [f"<|im_start|>user\nWhat is {a} times {b}? Explain briefly.<|im_end|>\n<|im_start|>assistant\n"
          f"{a} times {b} is {a * b}.<|im_end|>\n" for a in range(25) for b in range(25)]


_BPE = train_bpe(CORPUS, 290)  # module level: hypothesis tests take no function-scoped fixtures


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return _BPE


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_trained_bpe_round_trips_any_text(text: str) -> None:
    tok = _BPE
    assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_ids_and_digits(bpe: Tokenizer) -> None:
    assert isinstance(bpe, Tokenizer) and bpe.vocab_size == 290
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert [bpe.decode([i]) for i in bpe.encode("2026")] == ["2", "0", "2", "6"]
    with pytest.raises(ValueError, match="bos_token='<s>' is not among special_tokens"):
        train_bpe(CORPUS, 300, bos_token="<s>")


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHATS = {
    "two_turns": Conversation((Message("system", "Be brief."), Message("user", "What is 3 times 4?"),
                               Message("assistant", "12."), Message("user", "And 5 times 5?"),
                               Message("assistant", "25, since 5 times 5 is 25."))),
    "no_system": Conversation((Message("user", "hi"), Message("assistant", "Hello! How can I help?"))),
    "empty_reply": Conversation((Message("user", "Say nothing."), Message("assistant", ""))),
    "tools": Conversation((Message("user", "Weather in Oslo and Rome?"),
                           Message("assistant", "Checking.", (ToolCall("get_weather", {"city": "Oslo"}),
                                                              ToolCall("get_weather", {"city": "Rome"}))),
                           Message("tool", '{"c": 3}', tool_call_id="a"), Message("tool", '{"c": 21}', tool_call_id="b"),
                           Message("assistant", "Oslo 3 °C, Rome 21 °C.")), tools=(WEATHER,)),
}


def _expected_trained(conv: Conversation, template: str) -> list[str]:
    "The assistant spans each template trains on, written out by hand."
    out = []
    for m in conv.messages:
        if m.role != "assistant":
            continue
        calls = "".join(("\n" if (m.content or k) else "") + '<tool_call>\n{"name": "%s", "arguments": {"city": "%s"}}\n</tool_call>'
                        % (c.name, c.arguments["city"]) for k, c in enumerate(m.tool_calls))
        out.append(m.content + (calls if template == HERMES_TEMPLATE else "") + "<|im_end|>")
    return out


def _trained_runs(tok: Tokenizer, ct: object) -> list[str]:
    "Decoded text of each maximal run of mask-1 tokens."
    runs, cur = [], []
    for i, m in zip(ct.ids_T.tolist(), ct.loss_mask_T.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def _check_templates(tok: Tokenizer) -> None:
    for name, conv in CHATS.items():
        for template in (CHATML_TEMPLATE, HERMES_TEMPLATE):
            if template == CHATML_TEMPLATE and conv.tools:
                continue  # ChatML has no tool format
            ct = apply_chat_template(conv, tok, template)
            assert tok.decode(ct.ids_T) == ct.text == render_chat(conv, template)
            assert set(np.unique(ct.loss_mask_T).tolist()) <= {0.0, 1.0}
            expected = [s for s in _expected_trained(conv, template)]
            assert _trained_runs(tok, ct) == expected, (name, template[:20])
            check_prefix_preserving(conv, tok, template)
    calls = [t for t, trained in render_segments(CHATS["tools"], HERMES_TEMPLATE) if trained][0]
    assert parse_tool_calls(calls) == CHATS["tools"].messages[1].tool_calls


def test_shipped_templates_mask_and_prefix_with_a_trained_tokenizer(bpe: Tokenizer) -> None:
    _check_templates(bpe)


@pytest.mark.llm
def test_shipped_templates_mask_and_prefix_with_smollm2() -> None:
    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = load_tokenizer("smollm2")
    _check_templates(tok)
    text = "<|im_start|>user\nCafé ☕ costs 4.50€ — 12345 items\t\n\n<|im_end|>"
    assert tok.decode(tok.encode(text)) == text


def test_a_template_that_rewrites_history_fails_loudly(bpe: Tokenizer) -> None:
    # drops every assistant turn but the last (as some reasoning templates drop old thoughts)
    forgetful = CHATML_TEMPLATE.replace("{%- if message.role == 'assistant' -%}",
                                        "{%- if message.role == 'assistant' and not loop.last -%}{{- '...' -}}"
                                        "{%- elif message.role == 'assistant' -%}")
    with pytest.raises(ValueError, match=r"not prefix-preserving: rendering messages\[:3\] is not a prefix \(ids\)"):
        check_prefix_preserving(CHATS["two_turns"], bpe, forgetful)


def test_segment_boundary_inside_a_merge_is_refused(bpe: Tokenizer) -> None:
    glued = lambda conv, gen: [("user: Expl", False), ("ain briefly", True)]  # a word cut in two
    with pytest.raises(ValueError, match="tokenizing the trained and untrained segments apart"):
        apply_chat_template(CHATS["two_turns"], bpe, template_fn=glued)


def test_bad_conversations_name_the_message(bpe: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]\.role is 'bot'; a role is one of"):
        apply_chat_template(Conversation((Message("user", "x"), Message("bot", "y"))), bpe)
    with pytest.raises(TypeError, match=r"messages\[0\] is a dict, not a Message"):
        apply_chat_template(Conversation(({"role": "user", "content": "x"},)), bpe)
    with pytest.raises(ValueError, match=r"messages\[0\]\.content contains U\+E000"):
        apply_chat_template(Conversation((Message("user", "a\ue000b"),)), bpe)
    with pytest.raises(ValueError, match="tool call 0 must be a JSON object"):
        parse_tool_calls("<tool_call>[1, 2]</tool_call>")
