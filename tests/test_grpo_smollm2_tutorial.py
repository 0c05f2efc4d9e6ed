"""The "GRPO on SmolLM2-135M-Instruct" tutorial runs headlessly end to end (nbclient, a real kernel; about 30
minutes of CPU, so marked `slow`, out of `make test`; `make test-slow` or `pytest -m slow` runs it): every cell
runs, the reward curve is drawn, and GRPO with LoRA raises greedy held-out pass@1 by at least 10 points."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.timeout(3 * 3600)  # the notebook's budget is ~30 min on a quiet 2-core CPU; a loaded machine is slower
def test_grpo_smollm2_tutorial() -> None:
    from researchlab.llm.tokenizers import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sys.path.insert(0, str(ROOT))  # the one runner, shared with bench/bench_grpo_smollm2.py
    from bench.bench_grpo_smollm2 import GOAL_POINTS, notebook_text, result, run_notebook, unexecuted_cells

    nb = run_notebook()
    assert not unexecuted_cells(nb), unexecuted_cells(nb)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no reward curve"
    text = notebook_text(nb)
    r = result(nb)
    assert r["n"] == 128 and 0.0 < r["base"] < 0.6, r  # the reward is neither hopeless nor saturated at the start
    assert r["gain_points"] >= GOAL_POINTS, text[-3000:]
    assert "held-out pass@1 (greedy, n=128)" in text and "KL(policy || base)" in text, text[-3000:]
