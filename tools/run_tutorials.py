"""Execute the tutorials and keep their outputs, so the docs site shows the curves, samples and video preview.

`make tutorials` runs every notebook in `nbs/tutorials/` with a real kernel, at full budget (the `#| slow`
cells too, not `#| eval: false` ones), in a temporary working folder, and writes the outputs back into
the notebook. Inline mp4 videos stay out of the stored notebook (the tutorial shows a small GIF preview of
the same episode beside them); `nbdev_clean` then strips execution metadata. tests/test_notebook_outputs.py
caps what may be stored.
"""

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def _static(nb: nbformat.NotebookNode) -> None:
    "Keep what a static page can show: no inline `<video>` (megabytes of base64 mp4), widgets as their text."
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", [])
                            if "<video" not in "".join(o.get("data", {}).get("text/html", ""))]
            for o in cell.outputs:
                o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    skipped = {i: c for i, c in enumerate(nb.cells) if c.cell_type == "code" and "#| eval: false" in c.source}
    runnable = nbformat.from_dict(dict(nb, cells=[c for i, c in enumerate(nb.cells) if i not in skipped]))
    env = {"JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="rlab-tutorial-") as work:
        NotebookClient(runnable, timeout=7200, kernel_name="python3",  # grpo_smollm2: one cell trains ~25 min
                       resources={"metadata": {"path": work}}).execute()
    it = iter(runnable.cells)
    nb.cells = [c if i in skipped else next(it) for i, c in enumerate(nb.cells)]
    _static(nb)
    nbformat.write(nb, path)
    print(f"{path.relative_to(ROOT)}: executed, outputs kept")


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in (ROOT / "nbs" / "tutorials").glob("*.ipynb"))
    for name in names:
        run(ROOT / "nbs" / "tutorials" / name)
