"""researchlab.llm.tools: the Hermes `<tool_call>` reader turns every malformed block into a ToolCallError;
`tool_schema` from type hints and docments; `execute_tools` returns exceptions, bad arguments, unknown tools and
timeouts as tool results, runs a reply's calls concurrently and awaits async tools; the counts add up."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Literal

import pytest

from researchlab.llm.tools import (
    ToolCallError,
    ToolResult,
    ToolStats,
    execute_and_track_tools,
    execute_tools,
    extract_tool_calls,
    tool_message,
    tool_metrics,
    tool_schema,
    track_tool_calls,
)
from researchlab.llm.types import Message, ToolCall


def add(
    a: int,  # first term
    b: int = 0,  # second term
) -> int:
    "Add two integers.\n\nLonger text that is not part of the description."
    return a + b


def fail(
    why: str,  # the message
) -> str:
    "Always raises."
    raise RuntimeError(why)


def test_extract_reads_well_formed_calls_in_order() -> None:
    text = ('I will add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "fail", "arguments": {"why": "x"}, "id": "abc"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 5}"}</tool_call><tool_call>{"name": "add"}</tool_call>')
    assert extract_tool_calls(text) == (ToolCall("add", {"a": 1, "b": 2}, "call_0"), ToolCall("fail", {"why": "x"}, "abc"),
                                        ToolCall("add", {"a": 5}, "call_2"), ToolCall("add", {}, "call_3"))
    assert extract_tool_calls("plain text, and a stray </tool_call>") == ()


@pytest.mark.parametrize("block,why", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "is not valid JSON"),
    ("<tool_call></tool_call>", "is not valid JSON"),
    ('<tool_call>["add", 1]</tool_call>', 'a string "name"'),
    ('<tool_call>{"name": 3}</tool_call>', 'a string "name"'),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', '"arguments" that are a JSON object'),
    ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "a string but not JSON"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}', "never closed"),
])
def test_extract_turns_malformed_blocks_into_errors(block: str, why: str) -> None:
    (err,) = extract_tool_calls("text " + block)
    assert isinstance(err, ToolCallError) and why in err.error and err.id == "call_0"
    assert '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>' in err.error  # says the fix


def test_an_unclosed_call_does_not_swallow_the_next() -> None:
    calls = extract_tool_calls('<tool_call>{"name": "add"<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert isinstance(calls[0], ToolCallError) and "never closed" in calls[0].error
    assert calls[1] == ToolCall("add", {"a": 1}, "call_1")


def test_tool_schema_from_hints_and_docments() -> None:
    def search(
        query: str,  # what to look for
        limit: int = 5,  # at most this many
        exact: bool = False,  # whole words only
        tags: list[str] | None = None,  # filter
        order: Literal["asc", "desc"] = "asc",  # sort order
    ) -> list[str]:
        "Search the notes."
        return []

    s = tool_schema(search)
    assert (s["name"], s["description"]) == ("search", "Search the notes.")
    p = s["parameters"]
    assert p["type"] == "object" and p["required"] == ["query"] and p["additionalProperties"] is False
    assert p["properties"]["query"] == {"type": "string", "description": "what to look for"}
    assert p["properties"]["limit"] == {"type": "integer", "default": 5, "description": "at most this many"}
    assert p["properties"]["exact"]["type"] == "boolean"
    assert p["properties"]["order"]["enum"] == ["asc", "desc"]
    assert tool_schema(add)["description"] == "Add two integers."


def test_tool_schema_errors_name_the_parameter() -> None:
    def untyped(x, y: int) -> int:  # noqa: ANN001
        return y

    def star(*args: int) -> int:
        return 0

    with pytest.raises(TypeError, match="tool untyped: parameter 'x' has no type hint"):
        tool_schema(untyped)
    with pytest.raises(TypeError, match=r"parameter 'args' is \*args/\*\*kwargs"):
        tool_schema(star)


def test_execute_returns_every_failure_as_a_tool_result() -> None:
    calls = extract_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": "4", "b": 1}}</tool_call>'
        '<tool_call>{"name": "fail", "arguments": {"why": "boom"}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"b": 1}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{bad}</tool_call>')
    res = execute_tools(calls, [add, fail])
    assert [r.error for r in res] == [None, "exception", "invalid_arguments", "invalid_arguments", "unknown_tool",
                                      "parse_error"]
    assert res[0] == ToolResult("add", "call_0", "5", None, res[0].seconds)
    assert res[1].content == "error: fail raised RuntimeError: boom"
    assert "invalid arguments for add: a: Field required" in res[2].content
    assert "c: Extra inputs are not permitted (received 2)" in res[3].content
    assert res[4].content == "error: there is no tool 'nope'; the tools are ['add', 'fail']"
    assert res[5].content.startswith("error: tool call 5 is not valid JSON")
    assert tool_message(res[1]) == Message("tool", res[1].content, tool_call_id="call_1")


def test_a_hanging_tool_times_out_and_the_others_return() -> None:
    release = threading.Event()

    def hang(
        seconds: float,  # ignored: waits for the test to release it
    ) -> str:
        "Block until released."
        release.wait(60)
        return "late"

    calls = (ToolCall("hang", {"seconds": 1}, "h"), ToolCall("add", {"a": 2}, "a"))
    t0 = time.perf_counter()
    try:
        res = execute_tools(calls, {"hang": hang, "add": add}, timeout=0.3)
        elapsed = time.perf_counter() - t0
    finally:
        release.set()
    assert res[0] == ToolResult("hang", "h", "error: hang did not return within 0.3 s", "timeout", 0.3)
    assert (res[1].content, res[1].error) == ("2", None)
    assert elapsed < 10  # abandoned after its timeout, not waited for (60 s)


def test_calls_of_one_reply_run_concurrently_and_async_tools_are_awaited() -> None:
    barrier = threading.Barrier(2, timeout=20)  # passes only when both calls run at the same time

    def meet(
        who: str,  # a name
    ) -> str:
        "Wait for the other call."
        barrier.wait()
        return who

    async def later(
        x: int,  # a number
    ) -> dict:
        "Async: sleep, then answer."
        await asyncio.sleep(0.01)
        return {"x": x}

    res = execute_tools((ToolCall("meet", {"who": "a"}), ToolCall("meet", {"who": "b"}), ToolCall("later", {"x": 3})),
                        [meet, later], timeout=30)
    assert [r.content for r in res] == ["a", "b", '{"x": 3}'] and all(r.error is None for r in res)


def test_tracking_counts_per_tool_and_kind_without_mutating() -> None:
    calls = extract_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
                               '<tool_call>{"name": "fail", "arguments": {"why": "x"}}</tool_call><tool_call>x</tool_call>')
    res, stats = execute_and_track_tools(calls, [add, fail])
    assert dict(stats.calls) == {"add": 1, "fail": 1, "": 1}
    assert dict(stats.failures) == {"fail": 1, "": 1}
    assert dict(stats.errors) == {"exception": 1, "parse_error": 1}
    again = track_tool_calls(res, stats)
    assert (again.calls["add"], stats.calls["add"], ToolStats().calls) == (2, 1, {})
    m = tool_metrics(again)
    assert m["tools/calls"] == 6.0 and m["tools/failures"] == 4.0 and m["tools/success_rate"] == pytest.approx(2 / 6)
    assert m["tools/unparsed/calls"] == 2.0 and m["tools/errors/exception"] == 2.0 and m["tools/add/failures"] == 0.0
    assert tool_metrics(ToolStats())["tools/success_rate"] == 0.0


def test_tool_tables_reject_ambiguous_names() -> None:
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        execute_tools((), [add, add])
    with pytest.raises(ValueError, match="has no name"):
        execute_tools((), [lambda a: a])
