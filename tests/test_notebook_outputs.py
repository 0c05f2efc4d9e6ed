"""What the notebooks may keep as outputs: the tutorials keep theirs (the docs site shows them), within a cap.

`make tutorials` (tools/run_tutorials.py) writes the tutorials' outputs; the library notebooks are kept
without outputs (their examples are tests, re-run by `nbdev_test`). The cap keeps the repository lean: a
stored output is a PNG plot, a small GIF preview or text, never an inline mp4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT / "nbs").rglob("*.ipynb"))
TUTORIALS = sorted((ROOT / "nbs" / "tutorials").glob("*.ipynb"))
MAX_OUTPUT = 200_000  # bytes of one output
MAX_NOTEBOOK = 400_000  # bytes of all outputs of one notebook
MAX_TOTAL = 1_000_000  # bytes of all outputs of all notebooks


def _outputs(path: Path) -> list[tuple[int, dict]]:
    nb = json.loads(path.read_text())
    return [(i, o) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _size(output: dict) -> int:
    return len(json.dumps(output))


@pytest.mark.parametrize("path", NBS, ids=lambda p: str(p.relative_to(ROOT / "nbs")))
def test_outputs_within_the_cap(path: Path) -> None:
    outs = _outputs(path)
    big = [(i, _size(o)) for i, o in outs if _size(o) > MAX_OUTPUT]
    assert not big, f"{path.name}: outputs over {MAX_OUTPUT} bytes in cells {big}"
    total = sum(_size(o) for _, o in outs)
    assert total <= MAX_NOTEBOOK, f"{path.name}: {total} bytes of outputs (cap {MAX_NOTEBOOK})"
    videos = [i for i, o in outs if "<video" in "".join(o.get("data", {}).get("text/html", ""))]
    assert not videos, f"{path.name}: inline mp4 kept in cells {videos}; store a GIF preview (make tutorials)"
    if path not in TUTORIALS and path.name != "index.ipynb":  # index.ipynb's outputs are the README's
        assert not outs, f"{path.name}: library notebooks are stored without outputs; their examples are tests"


def test_total_output_size() -> None:
    total = sum(_size(o) for p in NBS for _, o in _outputs(p))
    assert total <= MAX_TOTAL, f"{total} bytes of notebook outputs in the repository (cap {MAX_TOTAL})"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorials_keep_their_figures(path: Path) -> None:
    kinds = {k for _, o in _outputs(path) for k in o.get("data", {})}
    assert "image/png" in kinds, f"{path.name}: no plot kept; run `make tutorials` and commit the outputs"
    if path.name == "ppo_cartpole.ipynb":
        html = " ".join("".join(o.get("data", {}).get("text/html", "")) for _, o in _outputs(path))
        assert "data:image/gif" in html, "ppo_cartpole.ipynb: the episode's GIF preview was not kept"


def test_sidebar_lists_every_notebook_once() -> None:
    "The hand-ordered docs sidebar (nbs/sidebar.yml) names every notebook, once, and nothing else."
    import yaml

    def walk(items: list) -> list[str]:
        out = []
        for it in items:
            out += walk(it["contents"]) if isinstance(it, dict) else [it]
        return out

    listed = walk(yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])
    assert len(listed) == len(set(listed)), sorted(n for n in listed if listed.count(n) > 1)
    assert sorted(listed) == sorted(str(p.relative_to(ROOT / "nbs")) for p in NBS)
