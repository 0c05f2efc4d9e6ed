"""Render `nbs/index.ipynb` to GitHub Markdown (README.md) without quarto.

Markdown cells are copied, code cells become ```python blocks (nbdev `#|` directive lines removed),
cells marked `#| hide` are skipped, and short text outputs follow their cell. `make sync-check`
compares README.md with this output, so the README can never drift from the notebook.
"""

import json
import re
import sys
from pathlib import Path


def _directives(src: str) -> set[str]:
    return {ln.strip()[2:].strip().split()[0] for ln in src.splitlines() if ln.strip().startswith("#|") and ln.strip()[2:].strip()}


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts: list[str] = ["<!-- WARNING: generated from nbs/index.ipynb by tools/readme.py; edit the notebook. -->"]
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            # links between notebooks point into nbs/ from the README at the repository root
            parts.append(re.sub(r"\]\((?!https?:|/|#)([\w./-]+\.ipynb)\)", r"](nbs/\1)", src.strip()))
        elif cell["cell_type"] == "code":
            flags = _directives(src)
            if "hide" in flags or "exporti" in flags:
                continue
            code = "\n".join(ln for ln in src.splitlines() if not ln.strip().startswith("#|")).strip()
            if not code:
                continue
            parts.append(f"```python\n{code}\n```")
            if "hide_output" in flags or "output: false" in src:
                continue
            text = []
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    text.append("".join(out["text"]))
                elif "text/plain" in out.get("data", {}):
                    text.append("".join(out["data"]["text/plain"]) + "\n")
            if text:
                parts.append("    " + "".join(text).rstrip("\n").replace("\n", "\n    "))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(Path(__file__).resolve().parent.parent / "nbs" / "index.ipynb"))
