"""The tutorials run headlessly (nbclient, a real kernel) on a small budget (`RLAB_TUTORIAL_SMALL=1`): every
cell, including those marked `#| slow`, except `#| eval: false` ones (interactive widgets)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "nbs" / "tutorials"


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and "#| eval: false" in c.source)]
    monkeypatch.setenv("RLAB_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    "All text the notebook printed or displayed; a stream is kept whole even when the kernel flushed it in pieces."
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))  # carries its own newlines: "continued to" + " 90\n" stays one line
            else:
                out.append("".join(o.get("data", {}).get("text/plain", "")) + "\n")
    return "".join(out)


def test_ppo_cartpole_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = _run("ppo_cartpole.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    assert "stopped at 80" in text and "continued to 90" in text, text[-2000:]
    assert "resumed at step 90" in text
    assert "FINISHED | params: 16" in text, text[-2000:]
    final = re.search(r"final return: ([\d.]+) after 102400 env steps", text)
    # a random policy scores ~20; this seeded 200-update run ends near 150 (149.5 with the keyed minibatch order)
    assert final and float(final.group(1)) > 100, text[-2000:]
    length = re.search(r"episode length: (\d+)", text)  # the greedy episode played after training
    assert length and int(length.group(1)) > 150, text[-2000:]
    html = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("<video" in "".join(o["data"]["text/html"]) for o in html), "no inline video"


def test_grpo_tiny_lm_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = _run("grpo_tiny_lm.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    assert "before training" in text and "after training" in text, text[-2000:]
    m = re.search(r"reward: first 10 updates ([\d.]+), last 10 updates ([\d.]+)", text)
    assert m, text[-2000:]
    first, last = map(float, m.groups())
    assert last > first + 0.15, (first, last)  # 30 GRPO updates through the Loop: the reward rises


def test_sweep_ppo_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = _run("sweep_ppo.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    assert "FINISHED - 9 of 9 trials finished" in text and "9 runs" in text, text[-2000:]
    assert re.search(r"best lr: [\d.e-]+ \(mean final return [\d.]+ over 3 seeds", text), text[-2000:]
    assert "ran 0 trials; skipped 9" in text, text[-2000:]
