"""researchlab.llm.view on real rollouts (a tiny random Llama, a BPE tokenizer trained here, a multi-turn tool
episode replayed by ScriptedGenerator through ToolEnv): the HTML marks prompt and environment tokens as masked
and sampled ones as trained, colours advantages by sign, escapes token text (`<`, `&`) and holds no tags but
div/span (and one style line); rollouts logged to a real `mlflow server` come back token-exact, their table reads with
`MlflowClient.load_table`, and logging a step again replaces its files instead of appending."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import jax
import numpy as np
import pytest
from mlflow import MlflowClient

from researchlab.design.mlflow_telemetry import MLFlowTelemetry
from researchlab.llm.chat import HERMES_TEMPLATE, render_chat
from researchlab.llm.envs import ScriptedGenerator, create_multiturn_rollout
from researchlab.llm.models import tiny_llama
from researchlab.llm.rollouts import Policy, Renderer, Rollout, RolloutGroup
from researchlab.llm.tokenizers import train_bpe
from researchlab.llm.tools import tool_schema
from researchlab.llm.types import Conversation, GenerationConfig, Message
from researchlab.llm.view import (
    group_advantages,
    load_rollouts,
    log_rollouts,
    logged_rollout_steps,
    rollout_from_record,
    rollout_record,
    rollouts_artifact,
    rollouts_table,
    view_group,
    view_rollout,
)


def add(
    a: int,  # first term
    b: int,  # second term
) -> int:
    "Add two integers."
    return a + b


QUESTION = "Is 2 < 3 & 3 > 2? What is 2 plus 3?"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
ANSWER = "2 plus 3 is 5 & 5 < 6.<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    corpus = [render_chat(Conversation((Message("user", f"What is {a} plus {b}? {a} < {b} & {b} > {a}"),),
                                       (tool_schema(add),)), HERMES_TEMPLATE) for a in range(10) for b in range(10)]
    return train_bpe(corpus + [CALL, ANSWER], 400)


@pytest.fixture(scope="module")
def rollout(tok) -> Rollout:
    model = tiny_llama(tok.vocab_size, 512, dim=32, n_layers=1, n_heads=2, key=jax.random.key(0))
    policy = Policy(model, ScriptedGenerator(tok, [[CALL, ANSWER]], pad_id=tok.pad_id), version=3)
    return create_multiturn_rollout(policy, Renderer(tok, HERMES_TEMPLATE), QUESTION,
                                    GenerationConfig(max_new_tokens=40), jax.random.key(1), tools=[add],
                                    reward_fn=lambda r: [1.0, 0.5], metadata={"answer": 5})


class _Spans(HTMLParser):
    "The tags of a page, and the class, title and text of each token span."

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.tokens: list[dict] = []
        self._in: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "span" and "rl-tok" in a.get("class", "").split():
            self._in = {"class": a["class"].split(), "title": a["title"], "style": a["style"], "text": ""}
            self.tokens.append(self._in)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._in["text"] += data


def _parse(markup: str) -> _Spans:
    p = _Spans()
    p.feed(markup)
    return p


def test_tokens_are_marked_masked_or_sampled_exactly(rollout, tok) -> None:
    spans = _parse(view_rollout(rollout, tok, advantage=1.0).html).tokens
    assert len(spans) == len(rollout.tokens_T)
    (s1, e1), (s2, e2) = rollout.turn_spans
    for i, s in enumerate(spans):
        sampled = rollout.loss_mask_T[i] == 1
        assert ("rl-sampled" in s["class"]) == sampled and ("rl-masked" in s["class"]) == (not sampled), i
        assert ("rl-prompt" in s["class"]) == (i < rollout.prompt_length), i
        assert ("rl-env" in s["class"]) == (e1 <= i < s2), i  # the tool answer and the next header
        assert f"id {int(rollout.tokens_T[i])}" in s["title"]
        if sampled:
            assert f"logprob {rollout.logprobs_T[i]:.3f}" in s["title"] and "advantage +1.000" in s["title"]
        else:
            assert "logprob" not in s["title"] and "advantage" not in s["title"]
    assert sum("rl-env" in s["class"] for s in spans) == s2 - e1 > 0


def test_token_text_is_escaped_and_the_markup_holds_only_div_and_span(rollout, tok) -> None:
    markup = view_rollout(rollout, tok, color="mask").html
    p = _parse(markup)
    assert p.tags == {"div", "span", "style"}  # `<tool_call>`, `<|im_start|>` and `<` in the text never become tags
    shown = "".join(s["text"] for s in p.tokens).replace("↵\n", "\n")
    assert shown == tok.decode(rollout.tokens_T.tolist())
    assert "&amp;" in markup and "&lt;" in markup and "&gt;" in markup
    assert not re.search(r"<(?!/?(div|span|style)\b)", markup), "an unescaped < outside div/span/style tags"
    assert markup.count("<style>") == 1
    assert "<script" not in markup


def test_advantage_colours_are_signed_per_token(rollout, tok) -> None:
    n = len(rollout.tokens_T)
    adv_T = np.where(np.arange(n) % 2 == 0, 0.7, -0.3) * rollout.loss_mask_T
    spans = _parse(view_rollout(rollout, tok, advantage=adv_T).html).tokens
    for i, s in enumerate(spans):
        if rollout.loss_mask_T[i] == 0:
            assert "rgba(" not in s["style"], i  # masked tokens carry no advantage colour
        elif adv_T[i] > 0:
            assert "rl-positive" in s["class"] and "rgba(22, 163, 74, 0.85)" in s["style"], i  # the largest: full
        else:
            assert "rl-negative" in s["class"] and "rgba(220, 38, 38, 0.45)" in s["style"], i  # 0.15 + 0.7 * 0.3/0.7


def test_group_view_uses_grpo_advantages_and_equal_rewards_show_no_colour(rollout, tok) -> None:
    good, bad = rollout._replace(rewards_K=np.array([2.0], np.float32)), rollout._replace(rewards_K=np.zeros(1, np.float32))
    adv = group_advantages(RolloutGroup((good, bad)))
    assert adv[0] > 0 > adv[1]
    p = _parse(view_group(RolloutGroup((good, bad)), tok, prompts="all").html)
    n = len(rollout.tokens_T)
    first, second = p.tokens[:n], p.tokens[n:]
    assert all("rl-positive" in s["class"] for s in first if "rl-sampled" in s["class"])
    assert all("rl-negative" in s["class"] for s in second if "rl-sampled" in s["class"])
    assert len(_parse(view_group([good, bad], tok).html).tokens) == 2 * len(rollout.tokens_T) - rollout.prompt_length
    flat = _parse(view_group([good, good, good], tok).html)
    assert not any("rgba(" in s["style"] for s in flat.tokens)  # zero advantage: nothing to learn, no colour
    with pytest.raises(ValueError, match="one value per rollout"):
        view_group([good, bad], tok, advantages=[1.0])


def test_table_rows(rollout) -> None:
    (row,) = rollouts_table([rollout], advantages=[0.25])
    assert row["prompt"] == QUESTION
    assert row["completion"] == ('[assistant] add({"a": 2, "b": 3})\n[tool] 5\n[assistant] 2 plus 3 is 5 & 5 < 6.')
    assert (row["reward"], row["rewards"], row["stop_reason"]) == (1.5, [1.0, 0.5], "completed")
    assert (row["length"], row["tokens"], row["tool_calls"], row["tool_errors"], row["tools"]) == (
        int(rollout.loss_mask_T.sum()), len(rollout.tokens_T), 1, 0, "add ok")
    assert (row["advantage"], row["policy_version"], row["group"]) == (0.25, 3, 0)


def _same(a: Rollout, b: Rollout) -> None:
    for name in Rollout._fields:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        elif name == "metadata":
            assert dict(x) == dict(y)
        else:
            assert x == y, name


def test_record_round_trip_is_exact(rollout) -> None:
    with_ref = rollout._replace(ref_logprobs_T=rollout.logprobs_T * 0.5)
    for r in (rollout, with_ref):
        _same(r, rollout_from_record(json.loads(json.dumps(rollout_record(r)))))


def test_log_and_load_rollouts_on_a_real_server(rollout, mlflow_server, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"view-{np.random.default_rng().integers(1 << 30)}")
    run_id = client.create_run(exp).info.run_id
    other = rollout._replace(rewards_K=np.array([0.0, 0.0], np.float32), stop_reason="max_turns")
    groups = [RolloutGroup((rollout, other)), RolloutGroup((other,))]
    path = log_rollouts(run_id, groups, 40, advantages=[1.0, -1.0, 0.0], tracking_uri=mlflow_server.uri)
    assert path == rollouts_artifact(40) == "rollouts/step_000040.jsonl"
    telemetry = MLFlowTelemetry(run_id=run_id, tracking_uri=mlflow_server.uri)  # the run given as an object
    try:
        log_rollouts(telemetry, [rollout], 80)
        log_rollouts(telemetry, [other], 80)  # the same step again (a resumed run): replaced, not appended
        assert logged_rollout_steps(telemetry) == [40, 80]
    finally:
        telemetry.close()
    back = load_rollouts(run_id, 40, tracking_uri=mlflow_server.uri)
    assert len(back) == 3
    for a, b in zip([rollout, other, other], back):
        _same(a, b)
    (only,) = load_rollouts(run_id, 80, client=client)
    _same(other, only)
    with open(client.download_artifacts(run_id, path, str(tmp_path)), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["group"], r["index"], r["advantage"]) for r in records] == [
        (40, 0, 0, 1.0), (40, 0, 1, -1.0), (40, 1, 2, 0.0)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # load_table searches runs through mlflow's fluent API
    table = client.load_table(exp, rollouts_artifact(40, "table"), run_ids=[run_id])
    assert list(table["reward"]) == [1.5, 0.0, 0.0] and list(table["stop_reason"]) == ["completed", "max_turns", "max_turns"]
    assert list(table["group"]) == [0, 0, 1] and list(table["advantage"]) == [1.0, -1.0, 0.0]
    assert json.loads(table["rewards"][0]) == [1.0, 0.5]
    again = client.load_table(exp, rollouts_artifact(80, "table"), run_ids=[run_id])
    assert list(again["stop_reason"]) == ["max_turns"]  # one row: the second log replaced the first
    with pytest.raises(FileNotFoundError, match=r"steps with rollouts are \[40, 80\]"):
        load_rollouts(run_id, 120, client=client)
    with pytest.raises(ValueError, match="MLflow run id"):
        log_rollouts(object(), [rollout], 1, client=client)
