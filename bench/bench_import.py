"""Import time: `import researchlab.design.core`, `import researchlab` and the usual first line of a notebook
(`from researchlab import Config, Loop`) against `import jax, equinox, optax`, the libraries any JAX project
imports anyway, measured in the same run.

Targets (issue 11): core <= 1.1x the baseline, the package <= 1.2x. Exits non-zero when one is missed.
Each figure is the best of `--repeats` fresh interpreters (the statements alternate, so load on the shared
machine hits them alike), timed inside the interpreter around the import only (not the interpreter start).

    python bench/bench_import.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "import jax, equinox, optax"
CASES = {  # statement -> target ratio to the baseline (None: shown, no target)
    "import researchlab.design.core": 1.1,
    "import researchlab": 1.2,
    "from researchlab import Config, Loop": None,
}
_PROBE = "import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"


def _time(stmt: str) -> float:
    "Seconds `stmt` takes in a fresh interpreter."
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _PROBE.format(stmt=stmt)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.splitlines()[-1])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    stmts = [BASELINE, *CASES]
    best = {s: float("inf") for s in stmts}
    for _ in range(args.repeats):
        for s in stmts:
            best[s] = min(best[s], _time(s))
    base = best[BASELINE]
    print(f"{BASELINE:<40} {base * 1e3:7.0f} ms  (baseline, best of {args.repeats})")
    missed = []
    for s, target in CASES.items():
        ratio = best[s] / base
        goal = f"target <= {target}x" if target else "no target"
        print(f"{s:<40} {best[s] * 1e3:7.0f} ms  ratio {ratio:.2f}x ({goal})")
        if target and ratio > target:
            missed.append(s)
    if missed:
        print("missed:", ", ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
