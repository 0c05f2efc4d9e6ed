"""The "Tool use from scratch" tutorial runs headlessly (nbclient, a real kernel) on its small budget
(`RLAB_TUTORIAL_SMALL=1`, every cell but the `#| eval: false` widget): after the SFT warm-up, GRPO with
multi-turn tool rollouts raises the tool-use reward clearly, `Loop.resume` from a checkpoint continues
bit-exactly, and the rollout view and the rollouts stored in MLflow are shown."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _outputs(nb: nbformat.NotebookNode, mime: str) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") if o.get("output_type") == "stream" else "".join(o.get("data", {}).get(mime, "")))
    return "\n".join(out)


def test_tool_use_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(ROOT / "nbs" / "tutorials" / "tool_use.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and "#| eval: false" in c.source)]
    for name, value in (("RLAB_TUTORIAL_SMALL", "1"), ("JAX_PLATFORMS", "cpu"), ("MPLBACKEND", "Agg")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(nb, "text/plain")
    m = re.search(r"tool-use reward: first 3 updates ([\d.]+), last 3 updates ([\d.]+)", text)
    assert m, text[-3000:]
    first, last = map(float, m.groups())
    assert last > first + 0.2 and last > 0.6, (first, last)  # GRPO learns that calling the tool pays
    m = re.search(r"resumed at step (\d+)", text)
    assert m and int(m.group(1)) > 0, text[-3000:]
    m = re.search(r"continued to (\d+): (\d+) of (\d+) arrays equal, bit-exact: (\w+)", text)
    assert m and int(m.group(1)) == int(re.search(r"resumed at step (\d+)", text).group(1)) + 2, text[-3000:]
    assert m.group(2) == m.group(3) and m.group(4) == "True", m.group(0)
    assert re.search(r"rollouts stored at steps \[5, 10", text), text[-3000:]
    html = _outputs(nb, "text/html")
    assert html.count('class="rl-rollout"') >= 1 + 8 + 1  # one rollout, the group of 8, one read back from MLflow
    assert "rl-env rl-masked" in html and "rl-positive" in html and "rl-negative" in html
